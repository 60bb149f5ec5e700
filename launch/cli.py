"""The `rdp` command. Each room registers its own sub-commands, so this file only
collects them: pretrain (train, info, convert, flops), data_pipeline (data ...),
evals (eval), slurm (submit, submit-eval, status)."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMAND_MODULES = ("rdp.pretrain.cli", "rdp.data_pipeline.cli", "rdp.evals.cli", "rdp.slurm.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdp", description="Pretrain and evaluate recurrent-depth language models.")
    # the deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that room has no commands yet
                continue
            raise
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # megatron-core and DeepSpeed warn at import about optional GPU extras a CPU run never uses
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|tp_group is None).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`rdp train tiny --no-progress a.b=1`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - user-facing errors become one clear line
        from rdp.pretrain.config import ConfigError

        if isinstance(exc, (ConfigError, FileNotFoundError)) or getattr(exc, "user_facing", False):
            print(f"rdp {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
