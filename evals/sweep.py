"""`rdp eval`: every (task, depth) of a checkpoint, written to results.json after each pair
(a rerun skips finished pairs), then results.md and results.png.

Task names: any lm-eval task (e.g. arc_easy, hellaswag, gsm8k, gsm8k_cot), a task of an
`include_path` directory or a task YAML file; with `gsm8k_path` the gsm8k tasks read local
jsonl instead; `humaneval`; the synthetic reasoning tasks (`parity`, `s3`, `s5`, `squaring`,
`prefix_sums`, `pointer_chasing`) and task directories (one row per test split: `task/easy`,
`task/hard<d>`, or a directory's `<split>.jsonl` files).

The checkpoint is resolved to one concrete directory when the sweep starts; results.json and
every result in it record its step and weights' sha256, and a resumed sweep refuses results
of other weights (e.g. written before the run trained further).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from rdp.evals.reasoning import is_reasoning_task
from rdp.evals.task_names import is_task_file

RESULTS_FILE, TABLE_FILE, PLOT_FILE = "results.json", "results.md", "results.png"
PRIMARY_METRICS = ("exact_match,flexible-extract", "exact_match,strict-match", "acc_norm,none", "acc,none",
                   "exact_match,none", "word_perplexity,none")


class SweepError(ValueError):
    user_facing = True


@dataclass
class SweepConfig:
    checkpoint: str
    tasks: list[str]
    depths: list[int]
    out_dir: Optional[str] = None  # default: RUN_DIR/eval/step_XXXXXXXX (a Huginn dir: DIR/eval)
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    init_scale: float = 0.0
    exit_criterion: Optional[str] = None
    exit_threshold: Optional[float] = None
    cache: str = "full"
    cache_slots: int = 4
    continuous_compute: bool = False
    max_gen_toks: Optional[int] = None
    tokenizer: Optional[str] = None
    gsm8k_path: Optional[str] = None
    humaneval_samples: int = 1
    humaneval_k: list[int] = field(default_factory=lambda: [1])
    humaneval_temperature: float = 0.0
    reasoning_examples: int = 256
    seed: int = 1234
    unsafe_no_sandbox: bool = False  # each HumanEval entry records how its samples ran
    include_path: list[str] = field(default_factory=list)  # directories of custom lm-eval task YAMLs
    apply_chat_template: bool = False
    fewshot_as_multiturn: Optional[bool] = None  # None: as apply_chat_template (lm-eval's default)
    system_instruction: Optional[str] = None
    chat_template: Optional[str] = None  # a file or the template text; default: beside the tokenizer
    weights_sha256: Optional[str] = None  # refuse to run unless the checkpoint's weights have this hash

    def identity(self) -> dict:
        """Settings that change results: a resumed sweep must match them."""
        skip = {"tasks", "depths", "out_dir", "device", "batch_size", "unsafe_no_sandbox", "weights_sha256"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _primary(metrics: dict) -> tuple[str, float, Optional[float]]:
    for name in PRIMARY_METRICS:
        if name in metrics:
            break
    else:
        name = next(k for k, v in metrics.items() if "_stderr" not in k and isinstance(v, (int, float)))
    metric, _, filt = name.partition(",")
    stderr = metrics.get(f"{metric}_stderr,{filt}")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and not math.isnan(float(stderr)) else None
    return name, float(metrics[name]), stderr


def default_out_dir(checkpoint) -> Path:
    """RUN_DIR/eval/step_XXXXXXXX for a checkpoint of a run, so a later checkpoint's sweep
    never lands on an earlier one's; CHECKPOINT_DIR/eval otherwise."""
    from rdp.pretrain.checkpoint import CHECKPOINT_DIR

    if checkpoint.layout == "rdp" and checkpoint.path.parent.name == CHECKPOINT_DIR:
        return checkpoint.path.parent.parent / "eval" / checkpoint.path.name
    return checkpoint.path / "eval"


class Sweep:
    def __init__(self, cfg: SweepConfig, overwrite: bool = False, progress: bool = True, echo: bool = True):
        if not cfg.tasks or not cfg.depths:
            raise SweepError("give at least one task (--tasks) and one depth (--depths)")
        if any(d < 1 for d in cfg.depths):
            raise SweepError(f"--depths must be >= 1, got {cfg.depths}")
        try:  # bad exit criterion / cache names fail now, not after hours of other tasks
            from rdp.evals.runner import DepthSettings

            DepthSettings(num_steps=1, cache=cfg.cache, cache_slots=cfg.cache_slots,
                          exit_criterion=cfg.exit_criterion, exit_threshold=cfg.exit_threshold,
                          continuous_compute=cfg.continuous_compute)
        except ValueError as exc:
            raise SweepError(str(exc)) from None
        if cfg.exit_criterion not in (None, "learned") and any(is_reasoning_task(t) for t in cfg.tasks):
            raise SweepError(f"--exit-criterion {cfg.exit_criterion} is not supported on reasoning tasks (scored in one "
                             "forward, not token by token): use learned (a model with an exit gate) or none")
        if "humaneval" in cfg.tasks and not cfg.unsafe_no_sandbox:  # refuse now, not after the other tasks
            from rdp.evals.sandbox import SandboxUnavailable, bubblewrap

            try:
                bubblewrap()
            except SandboxUnavailable as exc:
                raise SweepError(str(exc)) from None
        if cfg.fewshot_as_multiturn is None:
            cfg.fewshot_as_multiturn = cfg.apply_chat_template
        if cfg.fewshot_as_multiturn and not cfg.apply_chat_template:
            raise SweepError("--fewshot_as_multiturn needs --apply_chat_template")
        from rdp.evals.checkpoint_info import describe_checkpoint

        self.cfg, self.progress, self.echo = cfg, progress, echo  # echo: a line per finished (task, depth)
        self.checkpoint = describe_checkpoint(cfg.checkpoint)  # one concrete directory from here on
        self.out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(self.checkpoint)
        self.path = self.out / RESULTS_FILE
        self._model = self._tokenizer = self._task_manager = None
        self._reasoning: dict[str, dict[int, dict]] = {}  # row -> depth -> scores, from one pass
        self.plan = self._plan_tasks()  # unknown task names fail here, before any tokenizer or model loads
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint.expect(cfg.weights_sha256)
        self.document = {"checkpoint": str(cfg.checkpoint), **self.checkpoint.record(), "settings": cfg.identity(),
                         "results": {}}
        if self.path.exists() and not overwrite:
            try:
                previous = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise SweepError(f"{self.path}: unreadable ({exc.msg}); pass --overwrite to start again") from None
            if previous.get("weights_sha256") != self.document["weights_sha256"]:
                recorded = previous.get("weights_sha256") or "not recorded"
                raise SweepError(
                    f"{self.path} holds results of {previous.get('checkpoint_dir') or previous.get('checkpoint')} "
                    f"(step {previous.get('step')}, weights sha256 {recorded[:12]}), but {cfg.checkpoint} is now "
                    f"{self.checkpoint.describe()}; results of other weights are never reused: use another --out "
                    f"(or --overwrite to replace them)")
            if previous.get("settings") != self.document["settings"]:
                changed = sorted(k for k in self.document["settings"]
                                 if previous.get("settings", {}).get(k) != self.document["settings"][k])
                raise SweepError(f"{self.path} was written with other settings ({', '.join(changed)}); "
                                 "use another --out or --overwrite")
            self.document["results"] = previous.get("results", {})

    def _plan_tasks(self):
        from rdp.evals.task_names import TaskPlan, plan_tasks

        lm_eval_tasks = [t for t in self.cfg.tasks if not is_reasoning_task(t) and t != "humaneval"]
        if not lm_eval_tasks:
            return TaskPlan()
        include, local = list(self.cfg.include_path), {}
        if self.cfg.gsm8k_path:
            from rdp.evals.gsm8k import write_local_tasks

            include.insert(0, str(self.out / "lm_eval_tasks"))
            local = write_local_tasks(self.cfg.gsm8k_path, include[0])

        def builtin_names(include_paths: list[str]) -> set[str]:
            from lm_eval.tasks import TaskManager

            self._task_manager = TaskManager(include_path=include_paths or None)
            return set(self._task_manager.all_tasks)

        return plan_tasks(lm_eval_tasks, include, local, builtin_names)

    # ---- lazily built pieces ------------------------------------------------------------------
    def model(self):
        if self._model is None:
            from rdp.evals.lm_adapter import load_checkpoint

            self._model = load_checkpoint(self.checkpoint.path, self.cfg.device, self.cfg.dtype)
        return self._model

    def lm(self, depth: int):
        from rdp.evals.lm_adapter import RecurrentDepthLM
        from rdp.evals.tokenizer import load_eval_tokenizer

        c = self.cfg
        if self._tokenizer is None:
            self._tokenizer = load_eval_tokenizer(self.checkpoint.path, self.model().config, c.tokenizer,
                                                  add_bos=self.checkpoint.add_bos, chat_template=c.chat_template)
        return RecurrentDepthLM(model=self.model(), tokenizer=self._tokenizer, num_steps=depth,
                                init_scale=c.init_scale, batch_size=c.batch_size, exit_criterion=c.exit_criterion,
                                exit_threshold=c.exit_threshold, cache=c.cache, cache_slots=c.cache_slots, seed=c.seed,
                                continuous_compute=c.continuous_compute)

    def task_manager(self):
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            # indexing lm-eval's thousands of built-in task files takes minutes on a small machine
            self._task_manager = TaskManager(include_path=self.plan.include_paths or None,
                                             include_defaults=self.plan.needs_builtin)
        return self._task_manager

    def _learned_exit_q(self) -> Optional[float]:
        """The CDF level q of `--exit-criterion learned` on a reasoning task, None for fixed depths."""
        if self.cfg.exit_criterion != "learned":
            return None
        if "exit_gate" not in self.model().transformer:
            raise SweepError(f"--exit-criterion learned needs a model trained with an exit gate (model.exit_gate=true); "
                             f"{self.checkpoint.path} has none")
        from rdp.evals.adaptive import ExitCriterion

        return ExitCriterion("learned", self.cfg.exit_threshold).threshold

    # ---- one (task, depth) ------------------------------------------------------------------
    def rows(self) -> list[tuple[str, str]]:
        """(row name in the table, task) pairs; a reasoning task gives one row per split."""
        rows = []
        for task in self.cfg.tasks:
            if is_reasoning_task(task):
                from rdp.data_pipeline.tasks import load_task

                spec = load_task(task)
                rows += [(f"{spec.name}/{split}", task) for split in spec.test_splits()]
            else:  # a task YAML file's row is its task name
                rows.append((self.plan.names[task] if is_task_file(task) else task, task))
        return rows

    def evaluate(self, row: str, task: str, depth: int) -> dict:
        c = self.cfg
        if is_reasoning_task(task):
            from rdp.evals.reasoning import score_split_depths

            if depth not in self._reasoning.get(row, {}):  # every depth still to do, in one pass
                todo = {d for d in c.depths if str(d) not in self.document["results"].get(row, {})} | {depth}
                self._reasoning[row] = score_split_depths(self.model(), task, row.rsplit("/", 1)[1], sorted(todo),
                                                          c.reasoning_examples, seed=c.seed,
                                                          exit_threshold=self._learned_exit_q())
            scores = dict(self._reasoning[row][depth])
            stderr, mean_steps = scores.pop("stderr"), scores.pop("mean_steps")
            return {"score": scores["exact_match"], "stderr": stderr, "metric": "exact_match", "all": scores,
                    "mean_steps": mean_steps}
        lm = self.lm(depth)
        if task == "humaneval":
            from rdp.evals.humaneval import run_humaneval

            kwargs = {"max_new_tokens": c.max_gen_toks} if c.max_gen_toks else {}
            scores = run_humaneval(lm, c.humaneval_samples, tuple(c.humaneval_k), c.humaneval_temperature,
                                   limit=c.limit, samples_path=self.out / f"humaneval_r{depth}.jsonl",
                                   unsafe_no_sandbox=c.unsafe_no_sandbox, **kwargs)
            k = min(c.humaneval_k)
            return {"score": scores[f"pass@{k}"], "stderr": scores[f"pass@{k}_stderr"], "metric": f"pass@{k}",
                    "all": scores, "mean_steps": lm.mean_steps()}
        import lm_eval

        manager = self.task_manager()
        name = self.plan.names.get(task, task)
        output = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=c.limit,
                                         num_fewshot=c.num_fewshot, log_samples=False,
                                         apply_chat_template=c.apply_chat_template,
                                         fewshot_as_multiturn=c.fewshot_as_multiturn,
                                         system_instruction=c.system_instruction,
                                         gen_kwargs=f"max_gen_toks={c.max_gen_toks}" if c.max_gen_toks else None,
                                         random_seed=c.seed, numpy_random_seed=c.seed, torch_random_seed=c.seed)
        metrics = output["results"][name]
        metric, score, stderr = _primary(metrics)
        clean = {k: (None if math.isnan(float(v)) else float(v)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}  # strict JSON: no NaN
        return {"score": score, "stderr": stderr, "metric": metric, "all": clean, "mean_steps": lm.mean_steps()}

    # ---- the sweep ----------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        pairs = [(row, task, depth) for row, task in self.rows() for depth in self.cfg.depths]
        todo = [p for p in pairs if str(p[2]) not in self.document["results"].get(p[0], {})]
        if len(todo) < len(pairs):
            print(f"rdp eval: resuming, {len(pairs) - len(todo)} of {len(pairs)} (task, depth) pairs already in {self.path}")
        bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="rdp eval", unit="pair",
                   disable=not self.progress)
        for row, task, depth in todo:
            bar.set_postfix_str(f"{row} r={depth}")
            started = time.perf_counter()
            entry = self.evaluate(row, task, depth)
            entry["seconds"] = round(time.perf_counter() - started, 3)
            entry.update(step=self.checkpoint.step, weights_sha256=self.checkpoint.weights_sha256())
            self.document["results"].setdefault(row, {})[str(depth)] = entry
            _atomic_write(self.path, json.dumps(self.document, indent=2))
            stderr = f" ± {entry['stderr']:.3f}" if entry.get("stderr") is not None else ""
            if self.echo:
                bar.write(f"rdp eval: {row} r={depth}: {entry['metric']} {entry['score']:.4f}{stderr} "
                          f"(mean steps {entry['mean_steps']:.2f}, {entry['seconds']:.1f}s)")
            bar.update(1)
        bar.close()
        self.write_reports()
        return self.document

    def write_reports(self) -> None:
        from rdp.evals.report import markdown_table, plot

        _atomic_write(self.path, json.dumps(self.document, indent=2))
        _atomic_write(self.out / TABLE_FILE, markdown_table(self.document))
        plot(self.document, self.out / PLOT_FILE)
