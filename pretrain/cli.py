"""`rdp train`, `rdp info`, `rdp convert`."""
from __future__ import annotations

import argparse
import json

from pretrain.config import load_config

INFO_DEPTHS = (1, 4, 8, 16, 32, 64)


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model (CONFIG is a preset name or a YAML path)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=50")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
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


def run_train(args: argparse.Namespace) -> int:
    from pretrain.train import train

    config = load_config(args.config, args.overrides)
    result = train(config, progress=not args.no_progress)
    print(f"trained to step {result.final_step}; run dir {result.run_dir}")
    if result.eval_losses:
        print("held-out loss by test-time depth (init_scale 0):")
        for depth, loss in result.eval_losses.items():
            print(f"  depth {depth:>3}: {loss:.4f}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from pretrain.model import build_model, materialized_parameters, parameter_counts

    config = load_config(args.config, args.overrides)
    counts = parameter_counts(build_model(config.model, device="meta"))
    report = {
        "params_total": counts["total"],
        "params_core": counts["core"],
        "params_by_part": {k: v for k, v in counts.items() if k != "total"},
        "params_materialized": {str(r): materialized_parameters(counts, r) for r in range(1, 65)},
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
    from pretrain import convert

    if args.direction == "to-huginn":
        convert.export_huginn(args.source, args.output)
    else:
        convert.import_huginn(args.source, args.output)
    print(f"wrote {args.output}")
    return 0
