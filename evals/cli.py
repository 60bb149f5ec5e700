"""`rdp eval` (depth sweeps over lm-eval tasks, HumanEval and synthetic reasoning) and
`rdp reasoning` (train a small model on a reasoning task's easy split, then sweep depths)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(commands: argparse._SubParsersAction) -> None:
    ev = commands.add_parser("eval", help="evaluate a checkpoint at several test-time depths")
    ev.add_argument("checkpoint", help="run dir / checkpoint dir of this project, or a Huginn-layout dir")
    ev.add_argument("--tasks", type=_names, required=True,
                    help="comma-separated: lm-eval task names, humaneval, a built-in reasoning task (parity, s3, "
                         "s5, squaring, prefix_sums, pointer_chasing) or a task directory")
    ev.add_argument("--depths", type=_ints, default=[1, 4, 8, 16, 32, 64])
    ev.add_argument("--out", default=None,
                    help="output dir (default: RUN_DIR/eval/step_XXXXXXXX for a run's checkpoint, else CHECKPOINT/eval)")
    ev.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    ev.add_argument("--limit", type=int, default=None, help="documents per task (lm-eval --limit)")
    ev.add_argument("--num-fewshot", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ev.add_argument("--init-scale", type=float, default=0.0, help="std multiplier of the random initial state")
    ev.add_argument("--exit-criterion", default=None,
                    help="adaptive exit: kl, entropy-diff, latent-diff, argmax-stability, cosine, or learned "
                         "(the exit gate of a model trained with model.exit_gate=true; threshold = CDF level q)")
    ev.add_argument("--exit-threshold", type=float, default=None)
    ev.add_argument("--cache", default="full", help="KV cache for generation: full, latest, modulo or none")
    ev.add_argument("--cache-slots", type=int, default=4)
    ev.add_argument("--continuous-compute", action="store_true",
                    help="generation: start each token's state from the previous token's final state (changes results)")
    ev.add_argument("--max-gen-toks", type=int, default=None)
    ev.add_argument("--tokenizer", default=None, help="tokenizer.json / sentencepiece .model (default: found next to the checkpoint)")
    ev.add_argument("--gsm8k-path", default=None, help="local GSM8K jsonl (dir with test.jsonl[, train.jsonl]) for offline runs")
    ev.add_argument("--humaneval-samples", type=int, default=1)
    ev.add_argument("--humaneval-k", type=_ints, default=[1])
    ev.add_argument("--humaneval-temperature", type=float, default=0.0)
    ev.add_argument("--unsafe-no-sandbox", action="store_true",
                    help="run HumanEval's generated code without the bubblewrap sandbox (recorded in the results)")
    ev.add_argument("--reasoning-examples", type=int, default=256)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--include_path", "--include-path", dest="include_path", action="append", default=[],
                    metavar="DIR", help="a directory of custom lm-eval task YAMLs (repeatable); a task can also be "
                                        "given as the path of its YAML file")
    ev.add_argument("--apply_chat_template", "--apply-chat-template", dest="apply_chat_template",
                    action="store_true", help="render prompts with the chat template (as lm-eval's flag)")
    ev.add_argument("--fewshot_as_multiturn", "--fewshot-as-multiturn", dest="fewshot_as_multiturn", nargs="?",
                    const=True, default=None, type=lambda v: v.lower() in ("true", "1", "yes"), metavar="BOOL",
                    help="few-shot examples as chat turns (default: on with --apply_chat_template, as in lm-eval)")
    ev.add_argument("--system_instruction", "--system-instruction", dest="system_instruction", default=None)
    ev.add_argument("--chat-template", default=None,
                    help="template file or text (default: chat_template.jinja / tokenizer_config.json beside the "
                         "tokenizer)")
    ev.add_argument("--weights-sha256", default=None,
                    help="refuse unless the checkpoint's weights have this sha256 (eval array jobs pass it)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(handler=run_eval)

    rs = commands.add_parser("reasoning", help="train on a reasoning task (built-in or directory), then sweep depths")
    rs.add_argument("task", help="parity, s3, s5, squaring, prefix_sums, pointer_chasing, or a task directory "
                                 "(train.jsonl + <split>.jsonl)")
    rs.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    rs.add_argument("--preset", default="reasoning", help="training config (default: configs/reasoning.yaml)")
    rs.add_argument("--out", default=None, help="default: runs/reasoning-TASK")
    rs.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's train.max_steps)")
    rs.add_argument("--depths", type=_ints, default=[1, 2, 4, 8, 16, 32])
    rs.add_argument("--examples", type=int, default=256, help="examples per (split, depth); a file split: at most its lines")
    rs.add_argument("--exit-criterion", choices=["learned"], default=None,
                    help="learned: each depth is a cap, every position stops where the exit gate says "
                         "(train with model.exit_gate=true objective.loss=expected_exit)")
    rs.add_argument("--exit-threshold", type=float, default=None, help="the learned exit's CDF level q (default 0.5)")
    rs.add_argument("--no-progress", action="store_true")
    rs.set_defaults(handler=run_reasoning)

    from rdp.evals.demo import register as register_demo

    register_demo(commands)


def run_eval(args: argparse.Namespace) -> int:
    from rdp.evals.sweep import Sweep, SweepConfig

    cfg = SweepConfig(
        checkpoint=args.checkpoint, tasks=args.tasks, depths=args.depths,
        out_dir=args.out, limit=args.limit, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, init_scale=args.init_scale,
        exit_criterion=args.exit_criterion, exit_threshold=args.exit_threshold, cache=args.cache,
        cache_slots=args.cache_slots, continuous_compute=args.continuous_compute, max_gen_toks=args.max_gen_toks, tokenizer=args.tokenizer,
        gsm8k_path=args.gsm8k_path, humaneval_samples=args.humaneval_samples, humaneval_k=args.humaneval_k,
        humaneval_temperature=args.humaneval_temperature, reasoning_examples=args.reasoning_examples, seed=args.seed,
        unsafe_no_sandbox=args.unsafe_no_sandbox, include_path=args.include_path,
        apply_chat_template=args.apply_chat_template, fewshot_as_multiturn=args.fewshot_as_multiturn,
        system_instruction=args.system_instruction, chat_template=args.chat_template,
        weights_sha256=args.weights_sha256)
    sweep = Sweep(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    sweep.run()
    print((sweep.out / "results.md").read_text())
    print(f"rdp eval: wrote {sweep.out}/results.json, results.md, results.png")
    return 0


def run_reasoning(args: argparse.Namespace) -> int:
    from rdp.evals.reasoning import train_and_sweep

    sweep = train_and_sweep(args.task, args.out, args.preset, args.overrides, steps=args.steps, depths=args.depths,
                            examples=args.examples, progress=not args.no_progress,
                            exit_criterion=args.exit_criterion, exit_threshold=args.exit_threshold)
    print((sweep.out / "results.md").read_text())
    print(f"rdp reasoning: model in {sweep.cfg.checkpoint}, results in {sweep.out} (results.json, results.md, "
          f"results.png)")
    return 0
