"""Writing checkpoint files in the background, after a snapshot taken at the step boundary.

    snapshot (training waits)         every tensor DeepSpeed and the trainer save is copied
                                      into host memory: the weights may move on at once
    write (background thread)         torch.save / safetensors / JSON into the staging dir,
                                      then this rank's part of the manifest (size and
                                      sha256 of each file it wrote)
    publish (rank 0, once all ranks   manifest.json, rename .tmp-step_N -> step_N, move
    report their part written)        "latest", prune (pretrain/checkpoint.publish)

DeepSpeed writes through its `CheckpointEngine`; `SnapshotCheckpointEngine` is one whose
`save` takes the snapshot and queues the write, so DeepSpeed's own save_checkpoint (with its
collectives) runs unchanged in the training thread and returns after the snapshot. Nothing
here uses a collective from the background thread: ranks learn that all writes are done
through the trainer's all-reduce at a step boundary (pretrain/checkpointing.py).
"""
from __future__ import annotations

import copy
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch

try:  # DeepSpeed >= 0.10: the engine writes through this interface
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
except ImportError:  # pragma: no cover - DeepSpeed is a hard dependency; this keeps imports cheap to diagnose
    TorchCheckpointEngine = object


def snapshot(obj: Any) -> Any:
    """A copy of a (nested) state dict whose tensors are fresh host-memory copies. Containers
    are copied too (the optimizer mutates its own); other leaves are immutable in practice
    (numbers, strings, torch.Size) and shared."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, ...)
        for key, value in obj.items():
            out[key] = snapshot(value)
        return out
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot(v) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


class BackgroundWriter:
    """One thread that runs submitted writes in order. The first failure is kept and every
    later write is dropped (a checkpoint with one missing file is no checkpoint)."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._busy = 0
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="rdp-checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        with self._lock:
            self._busy += 1
        self._queue.put((fn, args, kwargs))

    def _run(self) -> None:
        while True:
            fn, args, kwargs = self._queue.get()
            try:
                if self.error is None:
                    fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - reported to the training thread
                self.error = exc
            finally:
                del fn, args, kwargs  # drop the snapshot's memory now, not at the next write
                with self._lock:
                    self._busy -= 1
                    self._done.notify_all()

    @property
    def idle(self) -> bool:
        with self._lock:
            return self._busy == 0

    def wait(self) -> None:
        """Block until every submitted write has run; raise the first failure."""
        self.drain()
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        """Block until every submitted write has run (failures stay in `error`)."""
        with self._lock:
            self._done.wait_for(lambda: self._busy == 0)


class SnapshotCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save engine, deferred: `save` snapshots the state dict and queues the
    write; the paths this rank writes are reported to `written`."""

    def __init__(self, writer: BackgroundWriter, written: Callable[[Path], None], config_params=None):
        super().__init__(config_params)
        self.name = "rdp.SnapshotCheckpointEngine"
        self.writer = writer
        self.written = written

    def save(self, state_dict, path: str):
        self.written(Path(path))
        self.writer.submit(torch.save, snapshot(state_dict), path)

    def preserves_storage_sharing(self):
        return False  # snapshot() already copies every tensor into its own compact storage
