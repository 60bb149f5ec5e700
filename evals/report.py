"""Sweep results as a Markdown table (tasks x depths, score ± stderr) and a PNG plot of
score against depth (log-2 x axis, one line per task)."""
from __future__ import annotations

import math
from pathlib import Path


def _depths(results: dict) -> list[int]:
    return sorted({int(d) for per_task in results.values() for d in per_task})


def _cell(entry: dict | None, adaptive: bool) -> str:
    if entry is None:
        return "–"
    text = f"{entry['score']:.3f} ± {entry['stderr']:.3f}" if entry.get("stderr") is not None else f"{entry['score']:.3f}"
    if adaptive and entry.get("mean_steps") is not None and not math.isnan(entry["mean_steps"]):
        text += f" (steps {entry['mean_steps']:.2f})"
    return text


def markdown_table(document: dict) -> str:
    results = document["results"]
    adaptive = bool(document.get("settings", {}).get("exit_criterion"))
    depths = _depths(results)
    lines = [f"Checkpoint: `{document.get('checkpoint', '?')}`", ""]
    if adaptive:
        s = document["settings"]
        rule = (f"learned (exit once the gate's CDF reaches q = {s.get('exit_threshold') or 0.5})"
                if s["exit_criterion"] == "learned" else f"{s['exit_criterion']} < {s.get('exit_threshold')}")
        lines += [f"Adaptive exit: {rule}; depth = step cap, (steps) = mean recurrence steps used per token", ""]
    lines.append("| task | metric | " + " | ".join(f"r={d}" for d in depths) + " |")
    lines.append("|---|---|" + "---|" * len(depths))
    for task, per_depth in results.items():
        metric = next((e.get("metric", "") for e in per_depth.values()), "")
        cells = [_cell(per_depth.get(str(d)), adaptive) for d in depths]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(document: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = document["results"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task, per_depth in results.items():
        depths = sorted(int(d) for d in per_depth)
        scores = [per_depth[str(d)]["score"] for d in depths]
        errors = [per_depth[str(d)].get("stderr") or 0.0 for d in depths]
        ax.errorbar(depths, scores, yerr=errors, marker="o", capsize=3, label=task)
    ax.set_xscale("log", base=2)
    all_depths = _depths(results)
    if all_depths:
        ax.set_xticks(all_depths)
        ax.set_xticklabels([str(d) for d in all_depths])
    ax.set_xlabel("test-time depth r (recurrence steps)")
    ax.set_ylabel("score")
    name = "/".join(Path(str(document.get("checkpoint", ""))).parts[-2:])
    ax.set_title(f"{name}: score vs depth")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
