"""`rdp train`, `rdp info`, `rdp convert`."""
from __future__ import annotations

import argparse
import json

from rdp.pretrain.config import load_config

INFO_DEPTHS = (1, 4, 8, 16, 32, 64)
# what `rdp flops --plan` assumes for a value not given (and says so)
PLAN_DEFAULTS = {"tokens": 800e9, "gpus": 4096, "gpu": "h100", "mfu": 0.4}


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (CONFIG is a preset name or a YAML path)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=50")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar: a log line every train.log_every steps instead")
    train.add_argument("--overwrite", action="store_true",
                       help="replace a run already in train.run_dir (its checkpoints, metrics, config)")
    train.set_defaults(handler=run_train)

    info = commands.add_parser("info", help="parameter counts of a config")
    info.add_argument("config")
    info.add_argument("overrides", nargs="*", metavar="key=value")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=run_info)

    convert = commands.add_parser("convert", help="convert between a training checkpoint and the Huginn layout")
    convert.add_argument("direction", choices=("to-huginn", "from-huginn"))
    convert.add_argument("source", help="to-huginn: run/checkpoint dir; from-huginn: Huginn dir")
    convert.add_argument("output", help="to-huginn: Huginn dir; from-huginn: checkpoint dir")
    convert.set_defaults(handler=run_convert)

    flops = commands.add_parser("flops", help="FLOPs per token and per parameter by depth; training cost plan")
    flops.add_argument("config")
    flops.add_argument("overrides", nargs="*", metavar="key=value")
    flops.add_argument("--seq-len", type=int, default=None, help="default: the config's model.max_seq_len")
    flops.add_argument("--depths", default="1,4,8,16,32,64", help="comma-separated test-time depths")
    flops.add_argument("--json", action="store_true")
    flops.add_argument("--plan", action="store_true", help="print total FLOPs, days and GPU-hours of a run")
    flops.add_argument("--tokens", type=float, default=None, help=f"default {PLAN_DEFAULTS['tokens']:.3g}")
    flops.add_argument("--gpus", type=int, default=None, help=f"default {PLAN_DEFAULTS['gpus']}")
    flops.add_argument("--gpu", default=None, help="h100, h200, a100 or mi250x (default h100)")
    flops.add_argument("--mfu", type=float, default=None, help=f"default {PLAN_DEFAULTS['mfu']}")
    flops.add_argument("--peak-flops", type=float, default=0.0, help="per-device peak FLOP/s for other devices")
    flops.set_defaults(handler=run_flops)


def run_train(args: argparse.Namespace) -> int:
    from rdp.pretrain.task_sizing import load_task_config
    from rdp.pretrain.train import train

    config = load_task_config(args.config, args.overrides)  # load_config, sized from a task source
    result = train(config, progress=not args.no_progress, overwrite=args.overwrite)
    if not result.is_main:  # one report per run, not per rank
        return result.exit_code
    print(f"trained to step {result.final_step}; run dir {result.run_dir}")
    if result.validation:
        from rdp.pretrain.validation import format_validation

        kind = "loss" if "loss" in result.validation else "exact match"
        print(f"validation {kind} by test-time depth (init_scale 0) on {result.validation_note}:")
        print("\n".join(format_validation(result.validation)))
    elif result.validation_note:
        print(f"no validation table: {result.validation_note}")
    return result.exit_code


def run_info(args: argparse.Namespace) -> int:
    from rdp.pretrain.model import build_model, materialized_parameters, parameter_counts

    config = load_config(args.config, args.overrides)
    counts = parameter_counts(build_model(config.model, device="meta"))
    report = {
        "params_total": counts["total"],
        "params_core": counts["core"],
        "params_by_part": {k: v for k, v in counts.items() if k != "total"},
        "params_materialized": {str(r): materialized_parameters(counts, r, config.model.low_level_steps) for r in range(1, 65)},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"parameters: {counts['total']:,}")
    for part, value in report["params_by_part"].items():
        print(f"  {part:<11} {value:>16,}")
    print("materialised at depth r:")
    for r in INFO_DEPTHS:
        print(f"  r={r:<3} {report['params_materialized'][str(r)]:>18,}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from rdp.pretrain import convert

    if args.direction == "to-huginn":
        convert.export_huginn(args.source, args.output)
    else:
        convert.import_huginn(args.source, args.output)
    print(f"wrote {args.output}")
    from pathlib import Path

    if not any((Path(args.output) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        print(f"note: no tokenizer.model / tokenizer.json beside {args.source}: {args.output} holds the weights only")
    return 0


def run_flops(args: argparse.Namespace) -> int:
    from rdp.pretrain.config import ConfigError
    from rdp.pretrain.flops import PEAK_FLOPS, flops_report, plan_training

    if args.gpu is not None and args.gpu.lower() not in PEAK_FLOPS and args.peak_flops <= 0:
        raise ConfigError(f"--gpu {args.gpu!r}: unknown GPU (known: {', '.join(PEAK_FLOPS)}); "
                          f"for another device give its peak with --peak-flops")
    assumed = {name: value for name, value in PLAN_DEFAULTS.items() if getattr(args, name) is None}
    for name, value in assumed.items():
        setattr(args, name, value)
    config = load_config(args.config, args.overrides)
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        raise ConfigError(f"--depths {args.depths!r}: expected comma-separated integers") from None
    report = flops_report(config.model, depths, args.seq_len, config.objective)
    if args.plan:
        plan = plan_training(config.model, args.tokens, args.gpus, args.gpu, args.mfu, args.seq_len, args.peak_flops,
                             config.objective)
        report["plan"] = {"tokens": args.tokens, "gpus": args.gpus, "gpu": args.gpu, "mfu": args.mfu,
                          "total_flops": plan.total_flops, "days": plan.days, "gpu_hours": plan.gpu_hours,
                          "assumed": sorted(assumed)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.config}: {report['params_total']:,} parameters, sequence length {report['seq_len']}")
    print(f"{'depth':>5} {'materialised params':>20} {'fwd FLOPs/token':>16} {'(causal)':>10} "
          f"{'FLOPs/param':>12} {'FLOPs/mat. param':>17}")
    for r in depths:
        print(f"{r:>5} {report['params_materialized'][r]:>20,} {report['forward_flops_per_token'][r]:>16.4g} "
              f"{report['forward_flops_per_token_causal'][r]:>10.4g} {report['flops_per_param'][r]:>12.2f} "
              f"{report['flops_per_materialized_param'][r]:>17.2f}")
    for nk, value in report["train_flops_per_token"].items():
        print(f"train FLOPs/token at (n, k) = ({nk}): {value:.4g}")
    if report["train_objective"] != "last" or report["train_segments"] > 1:
        print(f"training objective: {report['train_objective']}, {report['train_segments']} segment(s) per batch")
    print(f"train FLOPs/token, expected over the depth sampler: {report['train_flops_per_token_expected']:.4g} "
          f"(with recompute: {report['train_flops_per_token_expected_with_recompute']:.4g}; 6N = {report['six_n_per_token']:.4g})")
    if args.plan:
        p = report["plan"]
        if assumed:
            print("plan assumes (not given): " + ", ".join(
                f"--{name} {value:.3g}" if name == "tokens" else f"--{name} {value}" for name, value in assumed.items()))
        print(f"plan: {p['tokens']:.3g} tokens on {p['gpus']} x {p['gpu']} at MFU {p['mfu']}: "
              f"{p['total_flops']:.3g} FLOPs, {p['days']:.1f} days, {p['gpu_hours']:,.0f} GPU-hours")
    return 0
