"""`rdp submit`, `rdp submit-eval` (+ `rdp merge-eval`, run by its merge job), `rdp status`."""
from __future__ import annotations

import argparse
import os

SITE_HELP = ("site config: a YAML path or a name under slurm/sites/ (default: $RDP_SLURM_SITE, "
             "else built-in defaults)")


def _add_shape_arguments(parser: argparse.ArgumentParser, time_default: str | None) -> None:
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help="GPUs per node; one task per GPU. 0: CPU mode, see --tasks-per-node")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="tasks per node (default: --gpus-per-node, or 1 in CPU mode)")
    parser.add_argument("--time", required=time_default is None, default=time_default,
                        help="time limit, HH:MM:SS (or any sbatch --time format)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--site", default=None, help=SITE_HELP)


def register(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser("submit", help="submit a training run to SLURM")
    submit.add_argument("config", help="preset name or YAML path")
    submit.add_argument("overrides", nargs="*", metavar="key=value")
    _add_shape_arguments(submit, time_default=None)
    submit.add_argument("--chain", type=int, default=1,
                        help="K segments run one after another (job array with %%1), each resuming the run")
    submit.add_argument("--dry-run", action="store_true", help="write and print the sbatch script, submit nothing")
    submit.set_defaults(handler=run_submit)

    evaluate = commands.add_parser("submit-eval", help="submit a depth sweep as a SLURM array job + merge job")
    evaluate.add_argument("checkpoint", help="run dir or checkpoint dir")
    evaluate.add_argument("--tasks", required=True, help="comma-separated eval tasks")
    evaluate.add_argument("--depths", required=True, help="comma-separated test-time depths, e.g. 1,4,8,16,32")
    evaluate.add_argument("--split-tasks", action="store_true",
                          help="one array task per (task, depth) instead of one per depth")
    evaluate.add_argument("--output", default=None, help="results folder (default: CHECKPOINT/eval-sweep)")
    evaluate.add_argument("--eval-args", default="", help="extra arguments passed to every `rdp eval`, quoted")
    _add_shape_arguments(evaluate, time_default="01:00:00")
    evaluate.add_argument("--dry-run", action="store_true", help="write and print the scripts, submit nothing")
    evaluate.set_defaults(handler=run_submit_eval)

    merge = commands.add_parser("merge-eval", help="merge the parts of a `rdp submit-eval` sweep (the merge job runs this)")
    merge.add_argument("output_dir", help="the sweep's output folder (holds parts/)")
    merge.add_argument("--expect", type=int, default=None, help="number of parts; fewer found is an error after merging")
    merge.set_defaults(handler=run_merge_eval)

    status = commands.add_parser("status", help="jobs, newest checkpoint, tokens and loss of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=run_status)


def _shape(args: argparse.Namespace):
    from rdp.slurm.render import JobShape

    tasks = args.tasks_per_node or (args.gpus_per_node if args.gpus_per_node > 0 else 1)
    return JobShape(nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node, time=args.time,
                    partition=args.partition, account=args.account, qos=args.qos)


def _site(args: argparse.Namespace):
    from rdp.slurm.site import load_site

    return load_site(args.site or os.environ.get("RDP_SLURM_SITE") or None)


def run_submit(args: argparse.Namespace) -> int:
    from rdp.slurm.submit import submit_training

    submission = submit_training(args.config, args.overrides, _shape(args), _site(args),
                                 chain=args.chain, dry_run=args.dry_run)
    if args.dry_run:
        print(submission.script, end="")
        print(f"# dry run: wrote {submission.script_path}; nothing submitted")
        return 0
    print(f"wrote {submission.script_path}")
    print(f"submitted job {submission.job_id}" + (f" (chain of {args.chain})" if args.chain > 1 else ""))
    return 0


def run_submit_eval(args: argparse.Namespace) -> int:
    from rdp.slurm.eval_jobs import submit_eval

    result = submit_eval(args, _shape(args), _site(args))
    for path, text in result.scripts:
        if args.dry_run:
            print(f"# ---- {path}")
            print(text, end="")
    if args.dry_run:
        print(f"# dry run: wrote {len(result.scripts)} scripts under {result.output_dir}; nothing submitted")
        return 0
    print(f"submitted eval array job {result.array_job_id} ({result.array_size} tasks) and merge job "
          f"{result.merge_job_id}; results in {result.output_dir}")
    print(f"every task evaluates {result.checkpoint}")
    return 0


def run_merge_eval(args: argparse.Namespace) -> int:
    from rdp.slurm.eval_jobs import merge_parts

    merged, missing = merge_parts(args.output_dir, args.expect)
    from pathlib import Path

    print((Path(args.output_dir) / "results.md").read_text(), end="")
    print(f"rdp merge-eval: merged {sum(len(v) for v in merged['results'].values())} (row, depth) results "
          f"into {args.output_dir}/results.json, results.md, results.png")
    if missing:
        print(f"rdp merge-eval: parts missing (their array tasks failed; see slurm/logs): {', '.join(missing)}")
        return 1
    return 0


def run_status(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from rdp.slurm.status import format_status, run_status

    status = run_status(args.run_dir)
    if args.json:
        print(json.dumps(asdict(status), default=str, indent=2))
    else:
        print(format_status(status))
    return 0
