"""Checkpoints of a removal fine-tune, so that a run of hours survives a kill.

``remove-ln --out DIR`` keeps its checkpoints in ``DIR.partial/`` (``removal.safetensors``, then
``control.safetensors``), in the trainer's format (``workbench.checkpoint``: safetensors tensors and
JSON bookkeeping, never a pickle), each written atomically every N steps and once more when its phase
ends. The same command finds them and resumes: the frozen norms are re-installed from the recorded
schedule (their σ, not a new calibration), then weights, frozen σ buffers and the optimizer are loaded,
and the batches — a function of (seed, step) — continue where they stopped, so the final weights equal
an uninterrupted run's. A checkpoint written by a different command is refused, not resumed. ``DIR``
itself appears only when the whole result is written (``io.atomic_dir``); ``DIR.partial`` is deleted then.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..errors import WorkbenchError

DEFAULT_EVERY = 50


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


class PhaseCheckpoint:
    """The checkpoint of one phase (``removal`` or ``control``) of one ``remove-ln`` command."""

    def __init__(self, directory: Path, phase: str, fingerprint: dict[str, Any], every: int, main: bool = True):
        self.path = Path(directory) / f"{phase}.safetensors"
        self.phase = phase
        self.fingerprint = fingerprint
        self.every = every
        self.main = main  # under torchrun only rank 0 writes

    def check(self) -> None:
        """Refuse a checkpoint of another command (read from its header alone, before any work starts)."""
        if not self.path.exists():
            return
        theirs = checkpoint.read_header_entry(self.path, "fingerprint")
        if theirs != self.fingerprint:
            theirs = theirs if isinstance(theirs, dict) else {}
            differ = sorted(k for k in {**theirs, **self.fingerprint} if theirs.get(k) != self.fingerprint.get(k))
            raise WorkbenchError(
                f"{self.path.parent} holds an interrupted remove-ln with a different configuration "
                f"({', '.join(differ) or 'format'} differ); rerun the command that started it to resume, or delete "
                f"{self.path.parent}"
            )

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        self.check()
        return checkpoint.load(self.path)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.save(self.path, {**state, "fingerprint": self.fingerprint, "phase": self.phase})


def discard(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


__all__ = ["DEFAULT_EVERY", "PhaseCheckpoint", "discard", "partial_dir"]
