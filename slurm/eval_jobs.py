"""`rdp submit-eval`: a depth sweep as one SLURM array task per depth (or per task x depth)
plus a merge job that runs after all of them (afterany) and writes the sweep's
results.json, results.md and results.png exactly as `rdp eval` does (`rdp merge-eval`).

    OUT/parts/NNN/results.json     one array task's `rdp eval` output
    OUT/slurm/eval-array.sbatch, eval-merge.sbatch, logs/
    OUT/results.json, results.md, results.png   the merged sweep

The checkpoint is resolved at submission to one step directory and the sha256 of its
weights; every array task evaluates that directory and refuses other weights, so a training
job that publishes newer checkpoints meanwhile never mixes steps into one sweep.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from rdp.pretrain.config import ConfigError
from rdp.slurm.render import (JobShape, env_lines, fill, sbatch_option_lines, scheduling_options, setup_lines,
                               srun_flags, task_command)
from rdp.slurm.site import SiteConfig
from rdp.slurm.submit import sbatch

PARTS_DIR = "parts"
# what every part must share: the checkpoint, its resolved directory, step and weights, the settings
IDENTITY_KEYS = ("checkpoint", "checkpoint_dir", "step", "weights_sha256", "settings")


class MergeError(RuntimeError):
    user_facing = True


@dataclass
class EvalSubmission:
    output_dir: Path
    scripts: list[tuple[Path, str]] = field(default_factory=list)
    array_size: int = 0
    array_job_id: Optional[str] = None
    merge_job_id: Optional[str] = None
    checkpoint: str = ""  # the resolved checkpoint, its step and weights


def _split(text: str, what: str, cast=str) -> list:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} {text!r}: expected a comma-separated list") from None
    if not values:
        raise ConfigError(f"--{what}: give at least one value")
    return values


def _srun(site: SiteConfig, gpus: int, arguments: str) -> str:
    flags = ["--nodes=1", "--ntasks=1", f"--cpus-per-task={site.cpus_per_task}"]
    if gpus:
        flags.append(f"--gpus-per-node={gpus}")
    flags += srun_flags(site)
    return "srun " + " ".join(flags) + " " + task_command(site, []) + " " + arguments


def submit_eval(args, shape: JobShape, site: SiteConfig) -> EvalSubmission:
    shape.check()
    if shape.nodes != 1 or shape.tasks_per_node not in (1, shape.gpus_per_node):
        raise ConfigError("submit-eval runs one process per array task: use --nodes 1 (and at most one task per node)")
    from rdp.evals.checkpoint_info import describe_checkpoint
    from rdp.evals.sweep import default_out_dir

    tasks = _split(args.tasks, "tasks")
    depths = _split(args.depths, "depths", int)
    if any(d < 1 for d in depths):
        raise ConfigError(f"--depths must be >= 1, got {depths}")
    given = Path(args.checkpoint).expanduser()
    info = describe_checkpoint(given)  # the one checkpoint every array task evaluates
    checkpoint, weights = info.path, info.weights_sha256()
    output_dir = Path(args.output).expanduser().resolve() if args.output else default_out_dir(info)
    units = ([(task, depth) for task in tasks for depth in depths] if args.split_tasks
             else [(",".join(tasks), depth) for depth in depths])
    extra = shlex.split(args.eval_args)
    if shape.gpus_per_node and "--device" not in extra:
        extra += ["--device", "cuda"]
    slurm_dir = output_dir / "slurm"
    (slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {"created": created, "site_name": site.name, "setup_lines": setup_lines(site),
              "env_lines": env_lines(site), "output_dir": output_dir}
    eval_shape = JobShape(nodes=1, tasks_per_node=1, gpus_per_node=min(shape.gpus_per_node, 1), time=shape.time,
                          partition=shape.partition, account=shape.account, qos=shape.qos)
    name = f"rdp-eval-{given.resolve().name}"

    array_options = [("job-name", name)] + scheduling_options(eval_shape, site, site.cpus_per_task) + [
        ("array", f"0-{len(units) - 1}"), ("output", str(slurm_dir / "logs" / "%x-%A_%a.out"))]
    evaluate = (f"eval {shlex.quote(str(checkpoint))} --tasks \"${{TASKS[$i]}}\" --depths \"${{DEPTHS[$i]}}\" "
                f"--out \"$part\" --weights-sha256 {weights} --no-progress" + "".join(f" {shlex.quote(a)}" for a in extra))
    array_script = fill("eval-array.sbatch.tmpl", {
        **common, "unit": "(task, depth)" if args.split_tasks else "depth", "checkpoint": checkpoint,
        "sbatch_lines": sbatch_option_lines(array_options, site.sbatch_lines),
        "task_list": " ".join(shlex.quote(t) for t, _ in units),
        "depth_list": " ".join(str(d) for _, d in units),
        "parts_dir_quoted": shlex.quote(str(output_dir / PARTS_DIR)),
        "srun_line": _srun(site, eval_shape.gpus_per_node, evaluate)})

    merge_shape = JobShape(nodes=1, tasks_per_node=1, gpus_per_node=0, time=shape.time,
                           partition=shape.partition, account=shape.account, qos=shape.qos)
    merge_options = [("job-name", f"{name}-merge")] + scheduling_options(merge_shape, site, site.cpus_per_task) + [
        ("output", str(slurm_dir / "logs" / "%x-%j.out"))]
    merge_script = fill("eval-merge.sbatch.tmpl", {
        **common, "sbatch_lines": sbatch_option_lines(merge_options, site.sbatch_lines),
        "srun_line": _srun(site, 0, f"merge-eval {shlex.quote(str(output_dir))} --expect {len(units)}")})

    result = EvalSubmission(output_dir, array_size=len(units), checkpoint=info.describe())
    for file_name, text in (("eval-array.sbatch", array_script), ("eval-merge.sbatch", merge_script)):
        path = slurm_dir / file_name
        path.write_text(text)
        path.chmod(0o755)
        result.scripts.append((path, text))
    if args.dry_run:
        return result
    result.array_job_id = sbatch(result.scripts[0][0])
    # afterany: a failed depth still leaves the others merged, with its cells empty
    result.merge_job_id = sbatch(result.scripts[1][0], [f"--dependency=afterany:{result.array_job_id}"])
    with open(slurm_dir / "jobs.jsonl", "a") as handle:
        for kind, job_id in (("eval-array", result.array_job_id), ("eval-merge", result.merge_job_id)):
            handle.write(json.dumps({"submitted_at": created, "job_id": job_id, "kind": kind}) + "\n")
    return result


def merge_parts(output_dir: str | Path, expect: Optional[int] = None) -> tuple[dict, list[str]]:
    """Union of the parts' results (all must share checkpoint and settings) -> OUT/results.*;
    returns the merged document and the parts that were missing."""
    from rdp.evals.sweep import PLOT_FILE, RESULTS_FILE, TABLE_FILE, _atomic_write
    from rdp.evals.report import markdown_table, plot

    output_dir = Path(output_dir)
    parts_dir = output_dir / PARTS_DIR
    found = sorted(p for p in parts_dir.glob("*/" + RESULTS_FILE)) if parts_dir.exists() else []
    names = {p.parent.name for p in found}
    missing = [f"{i:03d}" for i in range(expect or 0) if f"{i:03d}" not in names]
    if not found:
        raise MergeError(f"{parts_dir}: no part has a {RESULTS_FILE}; see the array job's logs in "
                         f"{output_dir / 'slurm' / 'logs'}")
    merged: Optional[dict] = None
    for path in found:
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MergeError(f"{path}: unreadable ({exc.msg})") from None
        identity = {key: document.get(key) for key in IDENTITY_KEYS}
        if merged is None:
            merged = {**identity, "results": {}}
        elif identity != {key: merged[key] for key in IDENTITY_KEYS}:
            raise MergeError(f"{path}: evaluated another checkpoint or with other settings than {found[0]}")
        for row, per_depth in document.get("results", {}).items():
            merged["results"].setdefault(row, {}).update(per_depth)
    # depths in increasing order inside each row, as one `rdp eval` run would have written them
    merged["results"] = {row: dict(sorted(per_depth.items(), key=lambda item: int(item[0])))
                         for row, per_depth in merged["results"].items()}
    _atomic_write(output_dir / RESULTS_FILE, json.dumps(merged, indent=2))
    _atomic_write(output_dir / TABLE_FILE, markdown_table(merged))
    plot(merged, output_dir / PLOT_FILE)
    return merged, missing
