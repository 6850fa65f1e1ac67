"""Resumable training: long loops save their state every so often and a re-run resumes from it.

Within a `checkpoints(path)` block (the ``train`` command opens one at ``OUT-checkpoint``), every
training loop (`training.optimise`, alternating sparse coding) writes a checkpoint, the pair
``STEM.safetensors`` (parameters, optimiser state, step, random states, data position, losses so
far) + ``STEM.json`` (what is trained and the configuration it belongs to). Rank 0 writes it, each
file under a temporary name renamed into place. Started again, the loop finds the checkpoint,
checks that it belongs to the same training (another configuration is refused, naming the field
that differs), restores everything and goes on, so a killed and resumed run ends with the
uninterrupted run's result. The checkpoint is removed when the loop ends.

All the state a resume needs is in the tensors file (which is written first); the JSON describes
it, so a run killed between the two writes still resumes from consistent state.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from pathlib import Path

import torch

from . import _io, distributed

log = logging.getLogger(__name__)

FORMAT = "sparsecode-checkpoint"
#: seconds of training between two checkpoints when no step count is given (``checkpoint_every=0``)
EVERY_S = 600.0

_location: contextvars.ContextVar = contextvars.ContextVar("sparsecode_checkpoint", default=None)


@contextlib.contextmanager
def checkpoints(path):
    """Within this block, training loops checkpoint to ``STEM.safetensors`` + ``STEM.json`` (`path`'s
    stem) and resume from a checkpoint found there. A file there that is not a checkpoint is refused."""
    stem = _io.stem(path)
    _io.check_pair(stem, FORMAT, "sparsecode checkpoint")
    token = _location.set(stem)
    try:
        yield stem
    finally:
        _location.reset(token)


def location() -> Path | None:
    """The stem checkpoints go to in the enclosing `checkpoints` block, or None."""
    return _location.get()


def _plain(value):
    # the identity as JSON will give it back (tuples become lists), so that saved and current compare equal
    return json.loads(json.dumps(value, default=str))


class Checkpointer:
    """The checkpoints of one training loop: `resume` at the start, `due`/`save` after each step, `finish`.

    `identity` (JSON values) is what the checkpoint must match to be resumed: the configuration, the
    data's size and checksum, the parameters' shapes. `every`: steps between checkpoints; 0 every
    `EVERY_S` seconds. Outside a `checkpoints` block every method does nothing."""

    def __init__(self, what: str, identity: dict, every: int = 0):
        self.path = location()
        self.group = distributed.current()
        self.identity = _plain({"what": what, **identity})
        self.every = every
        self.last = time.monotonic()

    @property
    def active(self) -> bool:
        """Whether checkpoints are kept (within a `checkpoints` block)."""
        return self.path is not None

    def resume(self) -> dict[str, torch.Tensor] | None:
        """The saved state of this training (tensors, "step" among them), or None: start from scratch."""
        if not self.active:
            return None
        tensors_path, meta_path = _io.paired(self.path)
        found = tensors_path.is_file() and meta_path.is_file()
        if self.group.distributed:
            seen = self.group.gather(found)
            if len(set(seen)) > 1:
                raise RuntimeError(f"checkpoint {meta_path} is seen by ranks {[r for r, s in enumerate(seen) if s]} "
                                   "only: keep checkpoints on a file system that all ranks share")
        if not found:
            return None
        meta = _io.read_json(meta_path, "sparsecode checkpoint", {"identity": dict, "step": int}, format=FORMAT)
        self._check(meta["identity"], meta_path)
        # fresh (aligned) copies: kernels may round differently on the file's memory-mapped layout
        state = {name: t.clone() for name, t in _io.read_tensors(tensors_path, "sparsecode checkpoint").items()}
        if "step" not in state:
            raise ValueError(f"{tensors_path} holds no 'step': it is not a whole sparsecode checkpoint")
        self.last = time.monotonic()
        log.warning("%s: resuming from %s at step %d", self.identity["what"], meta_path, int(state["step"]))
        return state

    def _check(self, saved: dict, where: Path) -> None:
        for name, was, now in _differences(saved, self.identity):
            raise ValueError(f"{where} is a checkpoint of another training: {name} is {was!r} there and {now!r} "
                             "here; run with the same settings to resume, or delete it to start afresh")

    def due(self, step: int, steps: int) -> bool:
        """Whether to checkpoint after `step` of `steps` (never after the last: the loop then ends)."""
        if not self.active or step >= steps:
            return False
        if self.every:
            return step % self.every == 0
        return time.monotonic() - self.last >= EVERY_S

    def save(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write the state after `step` (rank 0 only; every rank holds the same)."""
        self.last = time.monotonic()
        if not self.group.main:
            return
        tensors_path, meta_path = _io.paired(self.path)
        _io.write_tensors(tensors_path, {**tensors, "step": torch.tensor([step], dtype=torch.int64)})
        _io.write_json(meta_path, {"format": FORMAT, "version": 1, "step": step, "identity": self.identity})
        log.info("%s: checkpoint at step %d in %s", self.identity["what"], step, tensors_path)

    def finish(self) -> None:
        """Remove the checkpoint: the training it would resume has ended."""
        if not self.active or not self.group.main:
            return
        for file in _io.paired(self.path):
            file.unlink(missing_ok=True)


def _differences(saved, now, prefix: str = ""):
    """(name, saved value, current value) of each differing entry, nested names joined by dots."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now)):
            yield from _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
    elif saved != now:
        yield prefix.rstrip("."), saved, now


def rng_state(generator: torch.Generator | None = None, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The random states a training step may draw from: torch's global one (and the device's), and `generator`'s."""
    state = {"rng.torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    if generator is not None:
        state["rng.generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                  device: torch.device | None = None) -> None:
    """Put back the random states `rng_state` returned."""
    torch.set_rng_state(state["rng.torch"])
    if "rng.cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng.cuda"], device)
    if generator is not None:
        generator.set_state(state["rng.generator"])


def data_checksum(x: torch.Tensor) -> dict:
    """A cheap fingerprint of training signals (their count, sum and sum of squares, to 8 digits),
    so that a checkpoint is not resumed on other data."""
    x = x.detach().double()
    return {"signals": int(x.shape[0]), "width": int(x.shape[1]) if x.ndim > 1 else 1,
            "sum": float(f"{float(x.sum()):.8g}"), "sum_of_squares": float(f"{float((x * x).sum()):.8g}")}
