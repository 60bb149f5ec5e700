"""lm-eval's own command line with the `rdp` model registered first, so every lm_eval
flag works unchanged:

    python -m rdp.evals.harness --model rdp --model_args checkpoint=runs/x,num_steps=16 --tasks hellaswag

One extra flag, `--local_tasks_only`: index only `--include_path` task files instead of
lm-eval's thousands of built-in ones (minutes on a small machine; useful offline).
"""
from __future__ import annotations

import sys

LOCAL_ONLY_FLAG = "--local_tasks_only"


def _index_only_include_path():
    """Swap lm-eval's TaskManager for one without the built-in index; returns the undo."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager

    class LocalTaskManager(base):
        def __init__(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    # the CLI looks the class up at call time (lm_eval/config/evaluate_config.py)
    lm_eval.tasks.TaskManager = LocalTaskManager
    return lambda: setattr(lm_eval.tasks, "TaskManager", base)


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from rdp.evals.lm_adapter import RecurrentDepthLM  # registers "rdp"

    args = list(sys.argv[1:] if argv is None else argv)
    undo = lambda: None  # noqa: E731
    if LOCAL_ONLY_FLAG in args:
        args.remove(LOCAL_ONLY_FLAG)
        undo = _index_only_include_path()
    saved_argv, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv
        undo()
    for lm in RecurrentDepthLM.instances:
        print(f"rdp: num_steps={lm.settings.num_steps} exit={lm.settings.exit_criterion or 'off'} "
              f"mean recurrence steps per token: {lm.mean_steps():.3f}")


if __name__ == "__main__":
    main()
