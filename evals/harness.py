"""lm-eval's own command line with the `rdp` model registered first, so every lm_eval
flag works unchanged:

    python -m evals.harness --model rdp --model_args checkpoint=runs/x,num_steps=16 --tasks hellaswag
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from evals.lm_adapter import RecurrentDepthLM  # registers "rdp"

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    for lm in RecurrentDepthLM.instances:
        print(f"rdp: num_steps={lm.settings.num_steps} exit={lm.settings.exit_criterion or 'off'} "
              f"mean recurrence steps per token: {lm.mean_steps():.3f}")


if __name__ == "__main__":
    main()
