"""The removal method as parts, each a small dataclass that validates itself and owns its rules:

    Schedule       the order's pace: steps per norm, warm-up, preconditioning, cool-down, the lr shape
    Calibration    how σ is measured and followed: statistic, EMA, special positions and their hand-over
    HandOverSpec   how each norm moves from its live scale to σ (the classes in ``norms/handover.py``)
    Losses         the auxiliary objectives (``removal/losses.py``)
    Optimization   what one optimizer step is: lr, tokens, micro-batches, weight decay, clipping, batch seed
    Runtime        where and how it runs: dtype, FSDP, checkpoints, the control arm, evaluation

``RemovalConfig`` is their composition. Field names are unique across parts, so the method also has a
flat view (``RemovalConfig.of(**flat)``, ``flat()``): the ``remove-ln`` flags, recipes and
``summary.json`` use it. A field with ``help`` metadata is a flag; its default and help are written here
(or in the part's own module) only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import WorkbenchError
from ..norms.handover import HANDOVERS, HandOver, handover
from ..precision import check_dtype
from ..runtime import warmup_cosine
from .losses import Losses
from .options import opt
from .resume import DEFAULT_EVERY


@dataclass
class Schedule:
    steps_per_ln: int = opt(2, "fine-tuning steps after each norm is frozen (K)")
    warmup_steps: int = 5
    precondition: int = opt(0, "steps with --scale-loss and every norm live before the first is frozen")
    # After the last removal: a cool-down with cosine decay to lr·min_lr_ratio.
    final_steps: int | None = opt(None, "cool-down steps after the last removal (default: 30 % of the removal "
                                        "steps, at least the longest hand-over)")
    min_lr_ratio: float = 0.1
    # While the gate's input stays live, the MLP grows like ‖x‖, not ‖x‖².
    split_mlp: bool = opt(False, "gated MLPs: the up path's input gets its own norm, frozen first; the gate's "
                                 "stays live until last")

    def __post_init__(self) -> None:
        if self.steps_per_ln <= 0:
            raise WorkbenchError(f"--steps-per-ln must be at least 1, got {self.steps_per_ln}")
        if self.precondition < 0:
            raise WorkbenchError(f"--precondition must be ≥ 0, got {self.precondition}")
        if self.final_steps is not None and self.final_steps < 0:
            raise WorkbenchError(f"--final-steps must be ≥ 0, got {self.final_steps}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise WorkbenchError("warmup_steps must be ≥ 0 and min_lr_ratio in [0, 1]")

    def cooldown(self, removal_steps: int) -> int:
        return int(0.3 * removal_steps) if self.final_steps is None else self.final_steps

    def lr_at(self, step: int, removal_steps: int, final_steps: int, peak: float) -> float:
        """Linear warm-up, constant while norms are being removed (each removal needs the same room to
        adapt), then a cosine cool-down over the final steps."""
        if step >= self.warmup_steps and (step < removal_steps or final_steps == 0):
            return peak
        return warmup_cosine(step, peak, self.warmup_steps, removal_steps - 1, final_steps, self.min_lr_ratio)


def percentile(statistic: str) -> float | None:
    """NN of a ``qNN`` statistic (0 < NN < 100), else None."""
    try:
        q = float(statistic[1:]) if statistic.startswith("q") else None
    except ValueError:
        return None
    return q if q is not None and 0 < q < 100 else None


@dataclass
class Calibration:
    # "median" is robust to a few tokens with massive activations; with "qNN" most tokens are scaled
    # down and almost none up.
    sigma: str = opt("rms", "frozen std from the ordinary tokens' scales: rms (pooled std), median, or qNN "
                            "(percentile)")
    ema: float = opt(0.0, "EMA rate of the frozen std towards the live scale while fine-tuning (0: fixed)")
    special_positions: int = opt(1, "the first N positions keep their own std until the last event (with "
                                    "end-of-text tokens; 1: BOS)")
    special_steps: int = opt(0, "hand the special positions (BOS, EOT) over to the shared σ over N steps "
                                "(0: at once)")
    sink_prefix: bool = opt(False, "position 0 (always the document-start token) keeps its live norms to the end "
                                   "and is exported as a fixed key/value prefix (sink_prefix.safetensors) that the "
                                   "norm-free model attends to")

    def __post_init__(self) -> None:
        if not (self.sigma in ("rms", "median") or percentile(self.sigma) is not None):
            raise WorkbenchError(f"--sigma must be rms, median or qNN (a percentile, e.g. q99), got {self.sigma!r}")
        if not 0.0 <= self.ema < 1.0:
            raise WorkbenchError(f"--ema must lie in [0, 1), got {self.ema}")
        if self.special_positions < 1:
            raise WorkbenchError(f"--special-positions must be at least 1 (position 0), got {self.special_positions}")
        if self.special_steps < 0:
            raise WorkbenchError(f"--special-steps must be ≥ 0 (0: switch the special positions off at once), got "
                                 f"{self.special_steps}")


def _handover_help() -> str:
    lines = [f"{name} ({(cls.__doc__ or '').strip().rstrip('.')})" for name, cls in HANDOVERS.items()]
    return "hand-over from each norm's live scale to its frozen one: " + "; ".join(lines)


@dataclass
class HandOverSpec:
    bridge: str = opt("none", _handover_help())
    bridge_steps: int = opt(0, "steps over which --bridge hands over (each norm from its freezing on)")
    # Without it, a window a runaway token overflows is a skipped step: no gradient from it.
    guard: float = opt(0.0, "training only: soft-cap each frozen norm's per-position output RMS at C (growing as "
                            "C·(1 + log(r/C)) above), so an overflowing window still gives a gradient; off at "
                            "evaluation and in the exported model (0: off)")

    def __post_init__(self) -> None:
        self.build()  # the hand-over validates its own steps
        if self.guard != 0 and not 1 <= self.guard < 1e6:
            raise WorkbenchError(f"--guard C must be 0 (off) or at least 1 (ordinary positions have output RMS "
                                 f"≈ 1), got {self.guard}")

    def build(self) -> HandOver:
        return handover(self.bridge, self.bridge_steps)


@dataclass
class Optimization:
    tokens_per_step: int = opt(1024, "tokens per optimizer step: the global batch, rounded down to whole sequences")
    lr: float | None = opt(None, "learning rate (default: the family's, else 0.4 × the pre-training peak, "
                                 "else 6e-4)")
    micro_batch: int | None = opt(None, "sequences per forward pass (gradient accumulation; default: all at once)")
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_skipped: int = 5  # steps with a non-finite gradient are skipped; more than this many in a row is divergence
    seed: int = 1  # batch seed; pre-training used seed 0's batches

    def __post_init__(self) -> None:
        if self.tokens_per_step <= 0:
            raise WorkbenchError(f"--tokens-per-step must be positive, got {self.tokens_per_step}")
        # Above ~1e37 Adam's step size overflows float32 inside the optimizer (a crash, not a divergence).
        if self.lr is not None and not 0 < self.lr <= 1e30:
            raise WorkbenchError(f"--lr must be a positive number no larger than 1e30, got {self.lr}")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise WorkbenchError(f"--micro-batch must be positive, got {self.micro_batch}")

    def batch_size(self, n_ctx: int, world: int = 1) -> int:
        b = max(1, self.tokens_per_step // n_ctx)
        return max(world, b - b % world)


@dataclass
class Runtime:
    # Evaluations are always float32.
    dtype: str = opt("auto", "float32 | bfloat16 (autocast over float32 weights) | auto (bfloat16 where the "
                             "device computes it natively, else float32)")
    fsdp: bool = opt(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead "
                            "of DDP")
    checkpoint_every: int | None = opt(None, f"save a resumable checkpoint to OUT.partial every N steps (default "
                                             f"{DEFAULT_EVERY}, 0 under --fsdp; 0: off); the same command resumes it")
    control: bool = opt(True, "skip the control run (norms kept)", flag="--no-control")
    eval_batches: int = 16
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if self.checkpoint_every is None:
            self.checkpoint_every = 0 if self.fsdp else DEFAULT_EVERY
        if self.checkpoint_every < 0:
            raise WorkbenchError(f"--checkpoint-every must be ≥ 0 (0: no checkpoints), got {self.checkpoint_every}")
        if self.fsdp and self.checkpoint_every:
            raise WorkbenchError("--checkpoint-every is not supported with --fsdp (sharded state); pass --checkpoint-every 0")

    def check_world(self, world: int) -> None:
        """Rules that depend on the process group, checked once it exists."""
        if self.fsdp and world < 2:
            raise WorkbenchError("--fsdp shards the model across processes: run it under torchrun with at least 2")


PARTS: dict[str, type] = {"schedule": Schedule, "calibration": Calibration, "handover": HandOverSpec,
                          "losses": Losses, "optimization": Optimization, "runtime": Runtime}


@dataclass
class RemovalConfig:
    schedule: Schedule = field(default_factory=Schedule)
    calibration: Calibration = field(default_factory=Calibration)
    handover: HandOverSpec = field(default_factory=HandOverSpec)
    losses: Losses = field(default_factory=Losses)
    optimization: Optimization = field(default_factory=Optimization)
    runtime: Runtime = field(default_factory=Runtime)

    def __post_init__(self) -> None:
        # Norm-free, random tokens overflow (every SmolLM2 run): unguarded, the term is inf and each step skipped.
        if self.losses.random_penalty > 0 and not self.handover.guard:
            raise WorkbenchError("--random-penalty needs --guard C (a random window overflows without it); "
                                 "add --guard 4")
        if self.losses.teacher == "control" and not self.runtime.control:
            raise WorkbenchError("--teacher control distils from the control run; drop --no-control or use "
                                 "--teacher original")
        if self.losses.teacher == "control" and self.runtime.fsdp:
            raise WorkbenchError("--teacher control is not supported with --fsdp (a sharded teacher); run it "
                                 "without --fsdp or use --teacher original")

    def for_arm(self, remove: bool) -> RemovalConfig:
        """The method one arm runs: with ``--teacher control`` the control itself fine-tunes on cross-entropy."""
        if remove or self.losses.teacher != "control":
            return self
        return self.replace(objective="ce", teacher="original")

    @staticmethod
    def fields() -> list[tuple[str, dataclasses.Field]]:
        """(part, field) for every field of every part, in order: the method's flat view."""
        return [(part, f) for part, cls in PARTS.items() for f in dataclasses.fields(cls)]

    @classmethod
    def of(cls, **flat: Any) -> RemovalConfig:
        """The config from flat field values (each part validates its own; unknown names are refused)."""
        owner = {f.name: part for part, f in cls.fields()}
        unknown = sorted(set(flat) - set(owner))
        if unknown:
            raise WorkbenchError(f"remove-ln has no option {unknown[0]!r}; see remove-ln --help")
        grouped: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
        for k, v in flat.items():
            grouped[owner[k]][k] = v
        return cls(**{part: PARTS[part](**values) for part, values in grouped.items()})

    def flat(self) -> dict[str, Any]:
        return {f.name: getattr(getattr(self, part), f.name) for part, f in self.fields()}

    def replace(self, **flat: Any) -> RemovalConfig:
        return RemovalConfig.of(**{**self.flat(), **flat})

    def final_steps(self, removal_events: int) -> int:
        """Cool-down steps after ``removal_events`` events of K steps: every hand-over completes before the
        fold, so at least the longest one."""
        s = self.schedule
        return max(s.cooldown(removal_events * s.steps_per_ln), self.handover.bridge_steps,
                   self.calibration.special_steps)


__all__ = ["Calibration", "HandOverSpec", "Optimization", "PARTS", "RemovalConfig", "Runtime", "Schedule", "percentile"]
