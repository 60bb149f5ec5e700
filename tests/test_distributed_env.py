"""Process-environment discovery, TP divisibility, state-dict sharding and checkpoint
integrity: the pure parts of distributed training, without launching processes."""
from __future__ import annotations

import json

import pytest
import torch

from rdp.launch.env import LaunchError, discover, expand_nodelist, slurm_port
from rdp.pretrain.checkpoint import publish, prune, resolve_checkpoint, staging_dir, verify_checkpoint
from rdp.pretrain.config import ConfigError, load_config
from rdp.pretrain.parallel import ShardSpec, check_tensor_parallel, shard_state_dict, unshard_state_dicts


# ---- launchers -----------------------------------------------------------------------------------
def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29511",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}
    found = discover(env)
    assert (found.rank, found.world_size, found.local_rank, found.master_addr, found.master_port, found.launcher) == \
        (3, 4, 1, "node7", 29511, "torch")


def test_srun_step_uses_slurm_variables_first_host_and_job_port():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[007-008,010]", "SLURM_JOB_ID": "123456"}
    found = discover(env)
    assert (found.rank, found.world_size, found.local_rank, found.launcher) == (5, 8, 1, "slurm")
    assert found.master_addr == "gpu007"
    assert found.master_port == slurm_port("123456") == 15000 + 123456 % 20000


def test_batch_script_without_srun_is_a_single_process():
    # inside sbatch, SLURM_PROCID=0 and SLURM_NTASKS=4 but only one process runs
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-2]"}
    found = discover(env)
    assert (found.rank, found.world_size, found.launcher) == (0, 1, "single")


def test_nodelist_expansion_matches_scontrol():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node[8-10]") == ["node8", "node9", "node10"]
    assert expand_nodelist("a[1-2]-ib[3,5]") == ["a1-ib3", "a1-ib5", "a2-ib3", "a2-ib5"]
    assert expand_nodelist("localhost") == ["localhost"]


def test_bad_launcher_variables_are_named():
    with pytest.raises(LaunchError, match="WORLD_SIZE='two'"):
        discover({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        discover({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="rank 4 is outside world size 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


# ---- tensor-parallel layout ------------------------------------------------------------------------
def test_tp_degree_that_cannot_split_the_heads_lists_the_ones_that_can():
    cfg = load_config("huginn-3.5b").model
    for ok in (1, 5, 11, 55):
        check_tensor_parallel(cfg, ok)
    with pytest.raises(ConfigError, match=r"parallel\.tensor_parallel.*4.*num_heads=55.*1, 5, 11, 55$"):
        check_tensor_parallel(cfg, 4)
    with pytest.raises(ConfigError, match="does not divide the 6 launched processes"):
        check_tensor_parallel(cfg, 5, world_size=6)


def test_fused_qkv_shard_holds_the_ranks_heads_of_q_k_and_v():
    heads, head_dim, hidden = 4, 2, 8
    # row i of the full Wqkv weight filled with i: part p (q/k/v), head j, dim d at p*8 + j*2 + d
    full = torch.arange(3 * hidden, dtype=torch.float32)[:, None].expand(3 * hidden, hidden)
    spec = ShardSpec(dim=0, part_size=hidden, padded_size=hidden, parts=3)
    rank1 = spec.shard(full, rank=1, tp=2)[:, 0].tolist()
    # rank 1 owns heads 2 and 3: rows 4..7 of q, of k and of v, in that order
    assert rank1 == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    assert torch.equal(spec.unshard([spec.shard(full, r, 2) for r in range(2)]), full)


def test_padded_shards_round_trip_and_pad_with_zeros():
    gate_up = torch.randn(2 * 151, 8)  # intermediate 151 split 2 ways: padded to 152
    spec = ShardSpec(dim=0, part_size=151, padded_size=152, parts=2)
    shards = [spec.shard(gate_up, r, 2) for r in range(2)]
    assert [s.shape[0] for s in shards] == [152, 152]
    assert torch.equal(shards[1][75], torch.zeros(8)) and torch.equal(shards[1][151], torch.zeros(8))
    assert torch.equal(shards[0][:76], gate_up[:76]) and torch.equal(shards[0][76:], gate_up[151:227])
    full = {"w": gate_up, "norm": torch.ones(8)}
    states = [shard_state_dict(full, {"w": spec}, r, 2) for r in range(2)]
    back = unshard_state_dicts(states, {"w": spec})
    assert torch.equal(back["w"], gate_up) and torch.equal(back["norm"], full["norm"])


# ---- checkpoint integrity ---------------------------------------------------------------------------
def _fake_checkpoint(root, step, payload=b"x" * 100):
    staging = staging_dir(root, step)
    (staging / "deepspeed").mkdir(parents=True)
    (staging / "deepspeed" / "shard.pt").write_bytes(payload)
    (staging / "model.safetensors").write_bytes(b"w")
    return publish(staging, root, step)


def test_publish_writes_manifest_moves_latest_and_prune_keeps_last_and_every(tmp_path):
    for step in (2, 4, 6, 8, 10, 12):
        final = _fake_checkpoint(tmp_path, step)
        assert (tmp_path / "latest").read_text() == final.name
        prune(tmp_path, keep_last=2, keep_every=4)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == \
        ["step_00000004", "step_00000008", "step_00000010", "step_00000012"]
    manifest = json.loads((tmp_path / "step_00000012" / "manifest.json").read_text())["files"]
    assert manifest["deepspeed/shard.pt"]["size"] == 100 and "sha256" in manifest["deepspeed/shard.pt"]


def test_corrupted_or_incomplete_checkpoints_are_skipped_with_a_warning(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    newest = _fake_checkpoint(tmp_path, 6)
    assert verify_checkpoint(newest) is None
    (newest / "deepspeed" / "shard.pt").write_bytes(b"y" * 100)  # same size, other bytes
    assert "sha256" in verify_checkpoint(newest)
    with pytest.warns(UserWarning, match="step_00000006 is unusable .*corrupted"):
        assert resolve_checkpoint(tmp_path).name == "step_00000003"
    (newest / "manifest.json").unlink()
    assert "incomplete" in verify_checkpoint(newest)
    staging_dir(tmp_path, 9).mkdir()  # an interrupted write is never a candidate
    with pytest.warns(UserWarning, match="step_00000006"):
        assert resolve_checkpoint(tmp_path).name == "step_00000003"
