"""Reasoning tasks as data: built-in generators, task directories, the training stream,
sizing a config from a task, scoring. No model is trained here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rdp.data_pipeline.builtin_tasks import EDGE_BASE, NO_EDGE, NODES, composition_table
from rdp.data_pipeline.manifest import DataError
from rdp.data_pipeline.tasks import TaskScore, TaskStream, load_task


def follow_chains(inputs: np.ndarray) -> tuple[list[int], int]:
    """Answers by walking the listed edges, and the longest chain (nodes)."""
    successor = {}
    for token in inputs[:NODES - 1]:
        if token != NO_EDGE:
            a, b = divmod(int(token) - EDGE_BASE, NODES)
            assert a not in successor and 0 <= b < NODES
            successor[a] = b
    answers, longest = [], 0
    for node in range(NODES):
        hops = 0
        while node in successor:
            node, hops = successor[node], hops + 1
        answers.append(node)
        longest = max(longest, hops + 1)
    return answers, longest


def test_pointer_chasing_examples_are_chains_with_the_named_difficulty():
    task = load_task("pointer_chasing")
    assert task.split_names()[:2] == ["train", "easy"] and task.seq_len == 2 * NODES - 1
    for split in task.split_names():
        batch = task.batch(split, 0, 16, seed=5)
        for x, y, level in zip(batch.inputs.numpy(), batch.labels.numpy(), batch.difficulty.tolist()):
            answers, longest = follow_chains(x)
            assert (y[:NODES - 1] == -100).all() and list(x[NODES - 1:]) == list(range(NODES))
            assert list(y[NODES - 1:]) == answers and longest == level
    # a pure function of (seed, index): any position, any order, same example
    again = task.batch("train", 3, 2, seed=5)
    assert torch.equal(again.inputs, task.batch("train", 0, 5, seed=5).inputs[3:])
    # test splits come from another seed than training
    assert not torch.equal(task.batch("easy", 0, 4, seed=5).inputs, task.batch("train", 0, 4, seed=5).inputs)


def test_running_state_tasks_and_prefix_sums_are_exact():
    parity = load_task("parity").batch("train", 0, 4, seed=3)
    assert (parity.labels == parity.inputs.cumsum(-1) % 2).all()
    s3 = load_task("s3").batch("train", 0, 2, seed=3)
    table = composition_table(3)
    for row_in, row_out in zip(s3.inputs.tolist(), s3.labels.tolist()):
        state = row_in[0]
        for item, label in zip(row_in[1:], row_out[1:]):
            state = table[state, item]
            assert label == state
    squaring = load_task("squaring").batch("train", 0, 2, seed=3)
    for r, row in zip(squaring.inputs[:, 0].tolist(), squaring.labels.tolist()):
        assert row == [pow(r, 2 ** (i + 1), 107) for i in range(6)]
    sums = load_task("prefix_sums").batch("hard32", 0, 3, seed=3)
    bits = sums.inputs[:, :32]
    assert (sums.labels[:, :32] == -100).all() and (sums.inputs[:, 32:] == 2).all()
    assert (sums.labels[:, 32:] == bits.cumsum(-1) % 2).all()


def write_task(root, splits: dict[str, list[dict]]):
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in splits.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def line(inputs, labels, difficulty=None):
    out = {"input": inputs, "labels": labels}
    if difficulty is not None:
        out["difficulty"] = difficulty
    return out


def test_task_directory_pads_masks_and_sizes(tmp_path):
    root = write_task(tmp_path / "copy", {
        "train": [line([1, 2, 3], [-100, 2, 3], 1), line([4, 5], [-100, 5], 2), line([9], [9])],
        "long": [line([1, 2, 3, 4, 5, 6], [-100, 2, 3, 4, 5, 6], 3), line([7, 8], [-100, 11], 2)]})
    task = load_task(str(root))
    assert task.name == "copy" and task.split_names() == ["train", "long"] and task.test_splits() == ["long"]
    assert (task.vocab_size, task.seq_len) == (12, 6)
    batch = task.batch("long", 0, 2, seed=0)
    assert batch.inputs.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 0, 0, 0, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3, 4, 5, 6], [-100, 11, -100, -100, -100, -100]]
    assert batch.difficulty.tolist() == [3, 2]
    # training order: each epoch a permutation of the train split, from (seed, epoch)
    stream = TaskStream(str(root), seq_len=8, vocab_size=12, micro_batch_size=3, seed=1)
    epochs = [sorted(tuple(r[r != 0].tolist()) for r in stream.next_batch()[0]) for _ in range(2)]
    assert epochs[0] == epochs[1] == sorted([(1, 2, 3), (4, 5), (9,)])


def test_task_stream_is_split_over_ranks_and_resumes_exactly(tmp_path):
    one = TaskStream("pointer_chasing", 23, 157, micro_batch_size=4, seed=1)
    ranks = [TaskStream("pointer_chasing", 23, 157, micro_batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    whole = one.next_batch()[0]
    assert torch.equal(whole[:2], ranks[0].next_batch()[0]) and torch.equal(whole[2:], ranks[1].next_batch()[0])
    assert ranks[0].state_dict()["position"] == one.state_dict()["position"] == 4
    resumed = TaskStream("pointer_chasing", 23, 157, micro_batch_size=4, seed=1)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(resumed.next_batch()[1], one.next_batch()[1])


@pytest.mark.parametrize("splits, message", [
    ({"test": [line([1], [1])]}, r"missing split train.jsonl"),
    ({"train": []}, r"train.jsonl: empty file \(no examples\)"),
    ({"train": [line([1, 2], [1])]}, r"train.jsonl:1: \"input\" has 2 ids but \"labels\" has 1"),
    ({"train": [line([1], [1]), line([1, 2], [-100, -100])]}, r"train.jsonl:2: every label is -100"),
    ({"train": [line([1], [1], difficulty="hard")]}, r"train.jsonl:1: \"difficulty\" must be"),
])
def test_task_directory_errors_name_the_file_and_line(tmp_path, splits, message):
    root = write_task(tmp_path / "bad", splits)
    with pytest.raises(DataError, match=message):
        load_task(str(root))


def test_task_errors_for_vocabulary_length_and_unknown_names(tmp_path):
    root = write_task(tmp_path / "big", {"train": [line([1, 2], [2, 3])], "test": [line([1, 300], [-100, 2])]})
    with pytest.raises(DataError, match=r"test.jsonl:1: input id 300 is outside the vocabulary \[0, 256\) "
                                        r"of model.vocab_size"):
        TaskStream(str(root), seq_len=8, vocab_size=256, micro_batch_size=2)
    with pytest.raises(DataError, match=r"train.jsonl:1: 2 tokens exceed data.seq_len 1"):
        TaskStream(str(root), seq_len=1, vocab_size=512, micro_batch_size=2)
    with pytest.raises(DataError, match=r"uses ids up to 156: outside the vocabulary \[0, 128\)"):
        TaskStream("pointer_chasing", seq_len=64, vocab_size=128, micro_batch_size=2)
    with pytest.raises(DataError, match="not a built-in task"):
        load_task(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="missing split 'hard99'"):
        load_task("parity").batch("hard99", 0, 1, seed=0)


def test_config_is_sized_from_the_task_unless_set(tmp_path):
    from rdp.pretrain.task_sizing import load_task_config

    root = write_task(tmp_path / "t", {"train": [line([1, 2, 40], [-100, 2, 3])], "test": [line([5] * 9, [5] * 9)]})
    sized = load_task_config("reasoning", [f"data.source=task:{root}"])
    assert (sized.model.vocab_size, sized.data.seq_len, sized.model.max_seq_len) == (41, 9, 9)
    assert sized.model.bos_token_id == 0  # unused by tasks, kept inside the vocabulary
    fixed = load_task_config("reasoning", [f"data.source=task:{root}", "model.vocab_size=64", "data.seq_len=16"])
    assert (fixed.model.vocab_size, fixed.data.seq_len, fixed.model.max_seq_len) == (64, 16, 16)
    preset = load_task_config("reasoning")  # the preset's own task
    assert (preset.model.vocab_size, preset.data.seq_len) == (NO_EDGE + 1, 2 * NODES - 1)


def test_scores_count_whole_examples_positions_and_difficulties():
    score = TaskScore()
    labels = torch.tensor([[-100, 1, 2], [-100, 3, 4], [5, 6, -100]])
    predictions = torch.tensor([[9, 1, 2], [0, 3, 0], [5, 6, 7]])
    logits = torch.nn.functional.one_hot(predictions, 10).float() * 2.0
    score.add(predictions, labels, torch.tensor([1, 2, 2]), logits)
    summary = score.summary()
    # CE of a logit-2 one-hot: right: log(e^2 + 9) - 2, wrong: log(e^2 + 9)
    lse = np.log(np.exp(2.0) + 9)
    assert abs(summary.pop("loss") - (5 * (lse - 2) + lse) / 6) < 1e-6
    assert summary == {"exact_match": 2 / 3, "position_accuracy": 5 / 6, "examples": 3,
                       "accuracy_by_difficulty": {"1": 1.0, "2": 0.5}}


@torch.no_grad()
def test_one_pass_over_depths_equals_a_forward_per_depth():
    from rdp.evals.reasoning import depth_logits, score_split, score_split_depths
    from rdp.pretrain.model import build_model
    from rdp.pretrain.task_sizing import load_task_config

    model = build_model(load_task_config("reasoning").model, seed=3).eval()
    inputs = load_task("pointer_chasing").batch("hard6", 0, 8, seed=1).inputs
    seen = []
    for depth, logits in depth_logits(model, inputs, [1, 3, 7]):
        assert torch.equal(logits, model(inputs, num_steps=(depth, 0), init_scale=0.0).logits)
        seen.append(depth)
    assert seen == [1, 3, 7]
    together = score_split_depths(model, "pointer_chasing", "hard6", [2, 5], num_examples=24, batch_size=16)
    assert together[5] == score_split(model, "pointer_chasing", "hard6", 5, num_examples=24, batch_size=16)
