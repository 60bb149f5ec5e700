"""rdp's model against the public huginn-0125 modelling code, same weights, same CPU, one run.

The reference is `raven_modeling_minimal.py` + `raven_config_minimal.py` as published with the
huginn-0125 weights and in the seal-rg/recurrent-pretraining repository (recpre/); a checkpoint
that the reference `save_pretrained` wrote holds both files too. It is not part of rdp: point
`--reference-dir` at a folder holding the two files. They need `transformers` 4.x (4.47-4.57
work; 5.x does not). Without --reference-dir the script says so and exits 0.

It first checks that both compute the same function (logits at depth 8 from the same weights,
max |difference| printed), then times, interleaved round by round (median of --repeats):
  eval:  forward at depth 8 (init_scale 0, no autograd), logits out
  train: forward + backward at (n, k) = (6, 2), loss out (no optimizer update in either)
and prints reference time / rdp time (> 1: rdp is faster), wall-clock and CPU time, for the
configuration given (the preset's own model.compile: `small` compiles) and the same weights with
the other model.compile setting, with the machine's load average. The reference always runs eager.

    .venv/bin/python benchmarks/bench_reference.py --reference-dir /path/to/huginn-0125
    .venv/bin/python benchmarks/bench_reference.py --reference-dir DIR --preset tiny --batch 8 --seq 64
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads

REFERENCE_FILES = ("raven_modeling_minimal.py", "raven_config_minimal.py")


def load_reference(directory: Path):
    """(RavenConfig, RavenForCausalLM) from the folder, imported as a package of its own (the
    modelling file imports its config relatively), without copying anything."""
    package = types.ModuleType("huginn_reference")
    package.__path__ = [str(directory)]
    sys.modules["huginn_reference"] = package
    modules = {}
    for stem in ("raven_config_minimal", "raven_modeling_minimal"):
        spec = importlib.util.spec_from_file_location(f"huginn_reference.{stem}", directory / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[stem] = module
    return modules["raven_config_minimal"].RavenConfig, modules["raven_modeling_minimal"].RavenForCausalLM


def reference_model(RavenConfig, RavenForCausalLM, cfg, state: dict[str, torch.Tensor]):
    ref_cfg = RavenConfig(
        n_embd=cfg.hidden_size, n_heads=cfg.num_heads, n_layers=cfg.prelude_layers + cfg.core_layers + cfg.coda_layers,
        block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size, intermediate_size=cfg.intermediate_size,
        n_layers_in_prelude=cfg.prelude_layers, n_layers_in_recurrent_block=cfg.core_layers,
        n_layers_in_coda=cfg.coda_layers, mean_recurrence=cfg.mean_recurrence,
        mean_backprop_depth=cfg.mean_backprop_depth, rope_base=cfg.rope_base, norm_eps=cfg.norm_eps,
        qk_bias=cfg.qk_bias, tie_embeddings=cfg.tie_embeddings)
    model = RavenForCausalLM(ref_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {"freqs_cis", "lm_head.weight"} or unexpected:
        raise SystemExit(f"reference model does not take rdp's weights: missing {missing}, unexpected {unexpected}")
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", type=Path, default=None,
                        help="folder holding raven_modeling_minimal.py and raven_config_minimal.py")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--train-steps", default="6,2", help="(n, k) of the training step")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compiled", action="store_true", help="time only the configuration given, "
                        "not also its twin with the other model.compile setting")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for rdp's model, "
                        "e.g. model.compile=false to time another configuration")
    args = parser.parse_args()
    if args.reference_dir is None:
        print("bench_reference: skipped: give --reference-dir DIR holding the huginn-0125 modelling code "
              f"({' and '.join(REFERENCE_FILES)}); it is not part of rdp")
        return 0
    missing = [name for name in REFERENCE_FILES if not (args.reference_dir / name).is_file()]
    if missing:
        raise SystemExit(f"bench_reference: {args.reference_dir} lacks {', '.join(missing)}")
    import torch  # imported once the arguments are known to be usable

    from rdp.pretrain.config import load_config
    from rdp.pretrain.model import build_model, model_from_state_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        RavenConfig, RavenForCausalLM = load_reference(args.reference_dir.resolve())
    except ImportError as exc:
        raise SystemExit(f"bench_reference: the reference code does not import ({exc}); it needs transformers 4.x") from None

    cfg = load_config(args.preset, [f"data.seq_len={args.seq}", *args.overrides]).model
    cfg = replace(cfg, kernels="torch") if cfg.kernels == "auto" and not torch.cuda.is_available() else cfg
    n, k = (int(v) for v in args.train_steps.split(","))
    torch.manual_seed(0)
    configured = f"rdp {'compiled' if cfg.compile else 'eager'}"  # as configured (the preset's default)
    ours = {configured: build_model(cfg, seed=0)}
    with torch.no_grad():  # norms and q/k bias away from their init, so both models use them
        for name, p in ours[configured].named_parameters():
            if "norm" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {name: t.detach().clone() for name, t in ours[configured].state_dict().items()}
    if not args.no_compiled:  # the same weights with the other model.compile setting, side by side
        ours[f"rdp {'eager' if cfg.compile else 'compiled'}"] = model_from_state_dict(
            replace(cfg, compile=not cfg.compile), state)
    ref = reference_model(RavenConfig, RavenForCausalLM, cfg, state)
    models = {**ours, "reference": ref}
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    labels = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    load_before = os.getloadavg()
    print(f"model {args.preset} ({sum(p.numel() for p in ref.parameters()):,} parameters, hidden {cfg.hidden_size}, "
          f"core layers {cfg.core_layers}), batch {args.batch} x {args.seq} tokens, fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, rdp kernels={cfg.kernels}")

    for model in models.values():
        model.eval()
    with torch.no_grad():
        b = ref(tokens, num_steps=args.depth, init_scale=0.0).logits
        for name, model in ours.items():
            a = model(tokens, num_steps=args.depth, init_scale=0.0).logits
            print(f"same function: {name}: logits at depth {args.depth}: max |rdp - reference| = "
                  f"{(a - b).abs().max().item():.3g} (max |logit| {b.abs().max().item():.3g})"
                  f"{'; bit-identical' if torch.equal(a, b) else ''}")

    def eval_step(model):
        with torch.no_grad():
            model(tokens, num_steps=args.depth, init_scale=0.0)

    def train_step(model):
        if model is ref:
            model(tokens, labels=labels, num_steps=(n, k)).loss.backward()
        else:
            model(tokens, labels=labels, num_steps=(n, k), return_logits=False).loss.backward()
        model.zero_grad(set_to_none=True)

    print(f"{'':<32} {'':<13} {'wall':>9} {'CPU time':>9} {'reference / this':>18}")
    for label, mode, fn in ((f"eval forward, depth {args.depth}", "eval", eval_step),
                            (f"train fwd+bwd, (n, k) = ({n}, {k})", "train", train_step)):
        for model in models.values():
            model.train(mode == "train")
            fn(model), fn(model)  # warm-up (and compilation, where configured)
        wall, cpu = {name: [] for name in models}, {name: [] for name in models}
        for _ in range(args.repeats):  # interleaved: every model sees the same machine load
            for name, model in models.items():
                started_wall, started_cpu = time.perf_counter(), time.process_time()
                fn(model)
                wall[name].append(time.perf_counter() - started_wall)
                cpu[name].append(time.process_time() - started_cpu)
        med = {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in models}
        for row, (name, (w, c)) in enumerate(med.items()):
            ratio = ("" if name == "reference" else
                     f"{med['reference'][0] / w:.2f}x wall, {med['reference'][1] / c:.2f}x CPU")
            print(f"{label if row == 0 else '':<32} {name:<13} {w * 1e3:>7.1f}ms {c * 1e3:>7.1f}ms  {ratio}")

    load_after = os.getloadavg()
    print(f"machine load (1-min average): {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
          f"on {os.cpu_count()} CPUs (CPU time is the fairer ratio on a loaded machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
