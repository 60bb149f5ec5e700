"""Distributed training on gloo, on this machine: megatron-core TP, DeepSpeed ZeRO 0-3,
exact resume, crash safety of checkpoints, one resume step for ranks whose views of the run
dir differ, DP resharding, launchers.

The 2-rank runs share one torchrun launch (megatron/DeepSpeed imports are paid once) and
the 1-rank runs happen in this process. Run as a script, this file is the worker those
launches execute: `python tests/test_distributed.py worker SPEC.json`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_helpers import faulty_loss_forward

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# the tiny preset, smaller batches; vocab 127 and intermediate 151 are not divisible by 2,
# so TP=2 exercises the padded vocabulary and MLP shards
BASE = ["data.seq_len=32", "train.micro_batch_size=2", "train.precision=fp32", "train.eval_depths=[]",
        "model.vocab_size=127", "model.intermediate_size=151", "train.checkpoint_every=100", "train.keep_last=10"]
EXACT_ENOUGH = 1e-5

pytestmark = pytest.mark.multiprocess


def config(run_dir, *extra):
    from rdp.pretrain.config import load_config

    return load_config("tiny", BASE + [f"train.run_dir={run_dir}", *extra])


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return env


def launch(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:  # a hang guard, generous for loaded machines
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def write_spec(path: Path, scenarios: dict[str, list[str]]) -> Path:
    path.write_text(json.dumps({"scenarios": scenarios}))
    return path


# ---- the runs the comparisons share ------------------------------------------------------------
TASK_VALIDATION = ["data.source=task:s3", "train.max_steps=3", "train.eval_every=2", "train.eval_depths=[1,3]"]
TWO_RANK = {
    "tp2": ["parallel.tensor_parallel=2", "train.max_steps=5"],
    "dp2_zero0": ["train.max_steps=5"],
    "dp2_zero1": ["train.max_steps=5", "parallel.zero_stage=1"],
    "dp2_zero2": ["train.max_steps=6", "parallel.zero_stage=2", "train.checkpoint_every=3"],
    "dp2_zero3": ["train.max_steps=5", "parallel.zero_stage=3"],
    # validation on a reasoning task's test splits (logits gathered over the TP group; under
    # ZeRO-3 every rank joins each forward)
    "tp2_task": ["parallel.tensor_parallel=2", *TASK_VALIDATION],
    "dp2_zero3_task": ["parallel.zero_stage=3", *TASK_VALIDATION],
}


ONE_RANK_ZERO2 = ["train.max_steps=6", "parallel.zero_stage=2", "train.grad_accum_steps=2", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    from rdp.pretrain.train import train

    root = tmp_path_factory.mktemp("two_rank")
    # a 1-rank ZeRO-2 run whose step-3 checkpoint the 2-rank launch resumes from (DP 1 -> 2)
    train(config(root / "dp1_zero2", *ONE_RANK_ZERO2), progress=False)
    scenarios = dict(TWO_RANK, dp1_to_dp2=["train.max_steps=6", "parallel.zero_stage=2",
                                           f"train.resume={root / 'dp1_zero2' / 'checkpoints' / 'step_00000003'}"])
    spec = write_spec(root / "spec.json", {str(root / name): extra for name, extra in scenarios.items()})
    # seven runs in one launch: minutes on a shared, loaded machine
    launch([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(Path(__file__)), "worker", str(spec)], timeout=840)
    return {name: root / name for name in [*scenarios, "dp1_zero2"]}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One process, 8 steps, checkpoints at 3 and 6 (and 8)."""
    from rdp.pretrain.train import train

    run_dir = tmp_path_factory.mktemp("reference")
    train(config(run_dir, "train.max_steps=8", "train.checkpoint_every=3"), progress=False)
    return run_dir


# ---- parallel layouts give the same training -----------------------------------------------------
def test_tensor_parallel_2_matches_single_device(two_rank_runs, reference_run):
    from rdp.pretrain.checkpoint import load_model

    tp2, tp1 = losses(two_rank_runs["tp2"]), losses(reference_run)[:5]
    assert len(tp2) == 5
    assert max(abs(a - b) for a, b in zip(tp2, tp1)) < EXACT_ENOUGH, (tp2, tp1)
    # the TP shards were consolidated into the single-device layout at save time
    model = load_model(two_rank_runs["tp2"])
    assert model.transformer.wte.weight.shape == (127, 64)
    assert model.transformer.core_block[0].mlp.fc.weight.shape == (302, 64)


def test_megatron_layers_at_tp_1_compute_what_the_plain_model_computes():
    import torch

    from rdp.launch.distributed import init_distributed
    from rdp.pretrain.model import build_model
    from rdp.pretrain.parallel import build_parallel_model

    cfg = config("unused").model
    init_distributed(1)
    megatron, plain = build_parallel_model(cfg, seed=7), build_model(cfg, seed=7)
    tokens, labels = torch.randint(0, 127, (2, 16)), torch.randint(0, 127, (2, 16))
    out = [m(tokens, labels=labels, num_steps=(2, 2), generator=torch.Generator().manual_seed(0)).loss
           for m in (megatron, plain)]
    for loss in out:
        loss.backward()
    assert abs(out[0].item() - out[1].item()) < 1e-6
    grads = dict(plain.named_parameters())
    assert max((p.grad - grads[n].grad).abs().max().item() for n, p in megatron.named_parameters()) < 1e-6


def test_data_parallel_2_matches_one_rank_with_gradient_accumulation(two_rank_runs, tmp_path):
    from rdp.pretrain.train import train

    train(config(tmp_path, "train.max_steps=5", "train.grad_accum_steps=2"), progress=False)
    dp2, accumulated = metrics(two_rank_runs["dp2_zero0"]), metrics(tmp_path)
    assert [r["tokens"] for r in dp2] == [r["tokens"] for r in accumulated] == [i * 4 * 32 for i in range(1, 6)]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(dp2, accumulated)) < EXACT_ENOUGH
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(dp2, accumulated)) < EXACT_ENOUGH


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_stage_0(two_rank_runs, stage):
    reference, sharded = metrics(two_rank_runs["dp2_zero0"]), metrics(two_rank_runs[f"dp2_zero{stage}"])[:5]
    assert len(sharded) == 5
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(reference, sharded)) < EXACT_ENOUGH
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(reference, sharded)) < EXACT_ENOUGH


def test_task_validation_at_tp2_and_zero3_matches_one_rank(two_rank_runs, tmp_path):
    from rdp.pretrain.train import train

    train(config(tmp_path / "one", *TASK_VALIDATION), progress=False)
    train(config(tmp_path / "accum", *TASK_VALIDATION, "train.grad_accum_steps=2"), progress=False)
    for sharded, reference in (("tp2_task", tmp_path / "one"), ("dp2_zero3_task", tmp_path / "accum")):
        got, expected = metrics(two_rank_runs[sharded]), metrics(reference)
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, expected)) < EXACT_ENOUGH
        validated = [r for r in got if "validation" in r]
        assert [r["step"] for r in validated] == [2] and set(validated[0]["validation"]) == {"easy", "hard16", "hard32"}
        for split, per_depth in validated[0]["validation"].items():
            for depth, got_scores in per_depth.items():
                want = expected[1]["validation"][split][depth]
                assert abs(got_scores.pop("loss") - want.pop("loss")) < EXACT_ENOUGH, (sharded, split, depth)
                assert got_scores == want, (sharded, split, depth)


# ---- checkpoints and resume ---------------------------------------------------------------------------
def test_resume_from_step_3_is_bit_identical(reference_run, tmp_path):
    from rdp.pretrain.train import train

    checkpoint = reference_run / "checkpoints" / "step_00000003"
    result = train(config(tmp_path, "train.max_steps=8", "train.checkpoint_every=3", f"train.resume={checkpoint}"),
                   progress=False)
    resumed, uninterrupted = metrics(tmp_path), metrics(reference_run)[3:]
    assert [r["step"] for r in resumed] == [4, 5, 6, 7, 8] and result.final_step == 8
    for key in ("loss", "grad_norm", "tokens", "data_position", "n", "k", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in uninterrupted], key
    assert (tmp_path / "FINISHED").exists()


def test_bf16_zero2_resume_is_bit_identical(tmp_path):
    from rdp.pretrain.train import train

    bf16 = ["train.max_steps=4", "train.precision=bf16", "parallel.zero_stage=2", "train.checkpoint_every=2"]
    train(config(tmp_path / "full", *bf16), progress=False)
    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000002"
    train(config(tmp_path / "resumed", *bf16, f"train.resume={checkpoint}"), progress=False)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")[2:]


def test_data_parallel_2_to_1_resume_continues_the_data(two_rank_runs, tmp_path):
    from rdp.pretrain.train import train

    source = two_rank_runs["dp2_zero2"]
    shutil.copytree(source / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000003")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    # 1 rank, ZeRO-2, accumulation 2: the same global batch as 2 ranks
    train(config(tmp_path, "train.max_steps=6", "parallel.zero_stage=2", "train.grad_accum_steps=2",
                 "train.resume=auto"), progress=False)
    resumed, original = metrics(tmp_path), metrics(source)[3:]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    # position 12 after 3 steps of 2 ranks x 2 samples, then 4 new samples per step: none repeated
    assert [r["data_position"] for r in resumed] == [16, 20, 24] == [r["data_position"] for r in original]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, original)) < EXACT_ENOUGH
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(resumed, original)) < EXACT_ENOUGH


def test_data_parallel_1_to_2_resume_reshards_the_optimizer_state(two_rank_runs):
    resumed, original = metrics(two_rank_runs["dp1_to_dp2"]), metrics(two_rank_runs["dp1_zero2"])[3:]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["data_position"] for r in resumed] == [16, 20, 24] == [r["data_position"] for r in original]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, original)) < EXACT_ENOUGH
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(resumed, original)) < EXACT_ENOUGH


@pytest.mark.parametrize("mode", ["sync", "background"])
def test_sigkill_during_checkpoint_write_keeps_the_previous_one(reference_run, tmp_path, mode):
    """kill -9 half-way through writing the step-6 checkpoint: with train.async_checkpoint
    off (training waits for the write), and on, while training has already reached step 8."""
    from rdp.pretrain.checkpoint import load_model
    from rdp.pretrain.train import train

    run_dir = tmp_path / "run"
    marker = tmp_path / "writing"
    spec = write_spec(tmp_path / "spec.json", {str(run_dir): ["train.max_steps=8", "train.checkpoint_every=3",
                                                               f"train.async_checkpoint={mode == 'background'}"]})
    process = subprocess.Popen([PYTHON, str(Path(__file__)), "block-in-checkpoint", str(spec), str(marker),
                                "background" if mode == "background" else ""],
                               cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert process.poll() is None, f"worker exited early:\n{process.stdout.read()[-4000:]}"
            assert time.time() < deadline, "the worker never reached the checkpoint at step 6"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000003"
    assert (checkpoints / ".tmp-step_00000006").exists() and not (checkpoints / "step_00000006").exists()
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7 if mode == "sync" else 9))
    reference = load_model(reference_run / "checkpoints" / "step_00000003")
    survivor = load_model(run_dir)
    for (name, a), b in zip(reference.state_dict().items(), survivor.state_dict().values()):
        assert a.equal(b), name

    train(config(run_dir, "train.max_steps=8", "train.checkpoint_every=3", "train.resume=auto"), progress=False)
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))  # steps 4-5 of the killed run were dropped
    assert [r["loss"] for r in records] == losses(reference_run)
    assert not list(checkpoints.glob(".tmp-*"))


def test_each_rank_hashes_the_files_it_wrote_and_verifies_its_share(two_rank_runs, tmp_path):
    """The manifest names the rank that wrote (and hashed) each file; at resume, rank r of W
    hashes the files of saving ranks r, r + W, ...: a corrupted file of rank 1 is found by
    rank 1's share of a 2-rank verification, not by rank 0's, and by a full one."""
    from rdp.pretrain.checkpoint import verify_checkpoint

    checkpoint = shutil.copytree(two_rank_runs["dp2_zero2"] / "checkpoints" / "step_00000006", tmp_path / "step")
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert all("sha256" in entry for entry in files.values())
    writers = {name: entry["rank"] for name, entry in files.items()}
    assert writers["rng/rank_00001.pt"] == writers["deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 1
    assert writers["rng/rank_00000.pt"] == writers["model.safetensors"] == 0
    victim = checkpoint / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a hash finds it
    victim.write_bytes(bytes(data))
    assert verify_checkpoint(checkpoint, hash_share=None) is None
    assert verify_checkpoint(checkpoint, hash_share=(0, 2)) is None
    problem = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its recorded sha256 (corrupted)"
    assert verify_checkpoint(checkpoint, hash_share=(1, 2)) == problem
    assert verify_checkpoint(checkpoint) == problem


def test_ranks_with_different_views_of_the_run_dir_resume_one_step(two_rank_runs, tmp_path):
    """Each rank of a 2-rank resume sees its own copy of the run dir at the same (relative)
    path, as nodes whose views of a shared filesystem differ. Rank 0 alone chooses the step: a
    newer "latest" that only rank 1 sees is ignored; a checkpoint incomplete on rank 1 is
    passed over on both ranks; a run dir where rank 1 sees no checkpoint is refused on both
    with the same one line, naming the rank."""
    source = two_rank_runs["dp2_zero2"] / "checkpoints"  # checkpoints at steps 3 and 6
    step3, step6 = "step_00000003", "step_00000006"
    views = {  # scenario: per rank, (the checkpoints it sees, what its "latest" names)
        "newer_latest_on_rank_1": [([step3], step3), ([step3, step6], step6)],
        "incomplete_on_rank_1": [([step3, step6], step6), ([step3, step6], step6)],
        "nothing_on_rank_1": [([step3, step6], step6), ([], None)],
    }
    scenarios = {}
    for scenario, ranks in views.items():
        for rank, (steps, latest) in enumerate(ranks):
            checkpoints = tmp_path / scenario / f"rank{rank}" / "run" / "checkpoints"
            checkpoints.mkdir(parents=True)
            for name in steps:
                shutil.copytree(source / name, checkpoints / name)
            if latest:
                (checkpoints / "latest").write_text(latest)
        max_steps = 6 if scenario == "nothing_on_rank_1" else 3  # 3: stop right after loading
        scenarios[str(tmp_path / scenario)] = ["parallel.zero_stage=2", "train.resume=auto", f"train.max_steps={max_steps}"]
    shard = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (tmp_path / "incomplete_on_rank_1" / "rank1" / "run" / "checkpoints" / step6 / shard).unlink()
    spec = write_spec(tmp_path / "spec.json", scenarios)
    launch([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(Path(__file__)), "resume-views", str(spec)], timeout=600)

    def outcome(scenario, rank):
        return json.loads((tmp_path / scenario / f"rank{rank}" / "outcome.json").read_text())

    for scenario in ("newer_latest_on_rank_1", "incomplete_on_rank_1"):
        for rank in (0, 1):
            seen = outcome(scenario, rank)
            assert (seen["loaded"], seen["step"], seen["error"]) == ([f"run/checkpoints/{step3}"], 3, None), \
                (scenario, rank, seen)
    assert outcome("newer_latest_on_rank_1", 0)["warnings"] == []
    assert outcome("incomplete_on_rank_1", 0)["warnings"] == [
        f"checkpoint run/checkpoints/{step6} is unusable ({shard} is missing (on rank 1 only)); "
        f"falling back to the previous one"]
    refused = ("run/checkpoints: no intact checkpoint to resume from: "
               f"{step6}: no manifest.json (incomplete write) (on rank 1 only); "
               f"{step3}: no manifest.json (incomplete write) (on rank 1 only) "
               "(move them aside to start over, or pass an intact checkpoint as train.resume=PATH)")
    for rank in (0, 1):
        seen = outcome("nothing_on_rank_1", rank)
        assert (seen["loaded"], seen["step"], seen["error"]) == ([], None, refused), (rank, seen)
    assert outcome("nothing_on_rank_1", 0)["warnings"] == [
        f"checkpoint run/checkpoints/{name} is unusable (no manifest.json (incomplete write) (on rank 1 only)); "
        f"falling back to the previous one" for name in (step6, step3)]


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(reference_run, tmp_path):
    from rdp.pretrain.checkpoint import load_model
    from rdp.pretrain.train import train

    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    for name in ("step_00000008",):
        shutil.rmtree(tmp_path / "checkpoints" / name)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000006")
    shard = tmp_path / "checkpoints" / "step_00000006" / "deepspeed" / "mp_rank_00_model_states.pt"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.warns(UserWarning, match="step_00000006.*truncated"):
        model = load_model(tmp_path)
    step3 = load_model(reference_run / "checkpoints" / "step_00000003")
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), step3.state_dict().values()))
    with pytest.warns(UserWarning, match="step_00000006"):
        train(config(tmp_path, "train.max_steps=8", "train.checkpoint_every=3", "train.resume=auto"), progress=False)
    assert [r["loss"] for r in metrics(tmp_path)] == losses(reference_run)[3:]


def test_single_process_cli_stops_on_signal_at_a_step_boundary_and_resumes(reference_run, tmp_path):
    """`rdp train` as one plain process; SIGUSR1 -> checkpoint at the next step boundary,
    exit 0, no FINISHED marker; resume=auto then reproduces the uninterrupted run."""
    from rdp.pretrain.train import train

    run_dir = tmp_path / "run"
    spec = write_spec(tmp_path / "spec.json", {str(run_dir): ["train.max_steps=8", "train.checkpoint_every=3"]})
    process = subprocess.Popen([PYTHON, str(Path(__file__)), "slow-cli", str(spec)], cwd=REPO, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 1):
        assert process.poll() is None, process.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-4000:]
    stopped_at = metrics(run_dir)[-1]["step"]
    assert stopped_at < 8 and not (run_dir / "FINISHED").exists()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"

    train(config(run_dir, "train.max_steps=8", "train.checkpoint_every=3", "train.resume=auto"), progress=False)
    assert losses(run_dir) == losses(reference_run)
    assert (run_dir / "FINISHED").exists()


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    from rdp.pretrain import engine
    from rdp.pretrain.checkpoint import load_model
    from rdp.pretrain.train import TrainingError, train

    # one micro-batch per step here: a bad gradient at step 2, a bad loss at steps 4 and 5
    monkeypatch.setattr(engine.LossOnly, "forward",
                        faulty_loss_forward(engine.LossOnly.forward, nan_gradient_at={2}, nan_loss_at={4, 5}))
    with pytest.raises(TrainingError, match=r"step 5: .*non-finite for 2 steps in a row"):
        train(config(tmp_path, "train.max_steps=8", "train.checkpoint_every=1", "parallel.zero_stage=2",
                     "train.max_bad_steps=2"), progress=False)
    records = metrics(tmp_path)
    assert [r["skipped"] for r in records] == [False, True, False, True, True]
    assert records[1]["loss"] == records[1]["loss"]  # the gradient, not the loss, was bad at step 2
    assert [r["skipped_total"] for r in records] == [0, 1, 1, 2, 3]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert not (checkpoints / "step_00000005").exists()
    weights = {s: list(load_model(checkpoints / f"step_{s:08d}").state_dict().values()) for s in (1, 2, 3, 4)}
    # a skipped step leaves every weight as it was; a good one moves them
    assert all(a.equal(b) for a, b in zip(weights[1], weights[2]))
    assert all(a.equal(b) for a, b in zip(weights[3], weights[4]))
    assert not all(a.equal(b) for a, b in zip(weights[2], weights[3]))


# ---- launchers ---------------------------------------------------------------------------------------
def test_mpirun_trains_like_torchrun(two_rank_runs, tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: install Open MPI (Debian: apt-get install openmpi-bin libopenmpi-dev)"
    spec = write_spec(tmp_path / "spec.json", {str(tmp_path / "run"): ["train.max_steps=2"]})
    launch([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
            PYTHON, str(Path(__file__)), "worker", str(spec)])
    via_mpi, via_torchrun = losses(tmp_path / "run"), losses(two_rank_runs["dp2_zero0"])[:2]
    assert max(abs(a - b) for a, b in zip(via_mpi, via_torchrun)) < 1e-6


# ---- worker entry points (executed by the launches above) ----------------------------------------------
def _scenarios(spec_file: str):
    return json.loads(Path(spec_file).read_text())["scenarios"].items()


def _worker(spec_file: str) -> None:
    from rdp.pretrain.train import train

    for run_dir, extra in _scenarios(spec_file):
        train(config(run_dir, *extra), progress=False)


def _block_in_checkpoint(spec_file: str, marker: str, background: str = "") -> None:
    """Train; on the second checkpoint, stop half-way through writing it (the test SIGKILLs).
    `background`: only once training has gone two steps past that checkpoint, which shows
    that the write runs behind the training instead of stalling it."""
    from rdp.pretrain import checkpointing

    original = checkpointing.save_model_weights
    saves = {"n": 0}

    def blocking(model, directory, cfg, state=None):
        saves["n"] += 1
        if saves["n"] == 2:
            (Path(directory) / "model.safetensors").write_bytes(b"partial")
            run_dir = Path(directory).parents[1]
            while background and len(metrics(run_dir)) < 8:
                time.sleep(0.05)
            Path(marker).touch()
            time.sleep(600)
        return original(model, directory, cfg, state=state)

    checkpointing.save_model_weights = blocking
    _worker(spec_file)


def _resume_views(spec_file: str) -> None:
    """Each rank runs in SCENARIO/rank<R>/ with train.run_dir=run: its own view of the run dir.
    Writes what it loaded (or the error that refused the resume) to SCENARIO/rank<R>/outcome.json."""
    import warnings

    from rdp.pretrain import train as train_module
    from rdp.pretrain.checkpoint import CheckpointError

    original = train_module.Trainer.load_checkpoint
    for scenario, extra in _scenarios(spec_file):
        view = Path(scenario) / f"rank{os.environ['RANK']}"
        os.chdir(view)
        loaded = []

        def recording(self, directory, _loaded=loaded):
            _loaded.append(str(directory))
            return original(self, directory)

        train_module.Trainer.load_checkpoint = recording
        step, error = None, None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                step = train_module.train(config("run", *extra), progress=False).final_step
            except CheckpointError as exc:
                error = str(exc)
        train_module.Trainer.load_checkpoint = original
        notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "checkpoint" in str(w.message)]
        (view / "outcome.json").write_text(json.dumps({"loaded": loaded, "step": step, "error": error,
                                                       "warnings": notes}))


def _slow_cli(spec_file: str) -> None:
    """`rdp train` with a pause after each step, so a signal lands mid-run."""
    from rdp.launch.cli import main
    from rdp.pretrain import train as train_module

    original = train_module.Trainer.train_step

    def slow(self):
        record = original(self)
        time.sleep(0.5)
        return record

    train_module.Trainer.train_step = slow
    (run_dir, extra), = _scenarios(spec_file)
    sys.exit(main(["train", "tiny", "--no-progress", *BASE, f"train.run_dir={run_dir}", *extra]))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    mode, *arguments = sys.argv[1:]
    modes = {"worker": _worker, "block-in-checkpoint": _block_in_checkpoint, "slow-cli": _slow_cli,
             "resume-views": _resume_views}
    modes[mode](*arguments)
