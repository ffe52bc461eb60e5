"""The removal fine-tune: freeze one norm at a time, K steps in between, and a control run with LN kept.

Works on any model exposed through a *removal adapter*: ``net`` (the module trained; called with
tokens, returns logits), ``sites`` (its norms in removal order, each a ``workbench.norms.Norm``),
``final_norm``, ``eot_id``, ``n_ctx`` and ``fold()`` (the norm-free model once all are frozen).
The method is a ``RemovalConfig`` (``removal/method.py``); what both arms share with pre-training
(process group, rank split, lr shape, evaluation) is ``workbench.runtime``'s.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from ..batches import TokenData, batch_fingerprint, batches_digest
from ..errors import WorkbenchError
from ..model.gpt import lm_cross_entropy
from ..norms.frozen import FrozenStandardize, SpecialPositions
from ..optim import adamw, load_state
from ..precision import autocast, resolve_dtype
from ..runtime import Dist, current
from ..runtime import evaluate as evaluate_forward
from .calibrate import calibrate, finite, freeze
from .losses import LossWatch, kl_to_teacher
from .method import RemovalConfig
from .resume import PhaseCheckpoint
from .robustness import random_windows
from .schedule import COOL_DOWN, PRECONDITION, SPECIAL_OFF


def evaluate(forward: Callable[[Tensor], Tensor], batches: list[Tensor], positions: SpecialPositions | None,
             device: torch.device) -> float:
    """Validation CE of ``forward`` (``runtime.evaluate``), the special positions set per batch."""
    return evaluate_forward(forward, batches, device, before=positions.update if positions is not None else None)


@torch.no_grad()
def evaluate_kl(forward: Callable[[Tensor], Tensor], teacher: Callable[[Tensor], Tensor], batches: list[Tensor],
                device: torch.device) -> float:
    """Mean KL(original ‖ model) per position over ``batches``, in nats (float32, as every evaluation)."""
    kls = [kl_to_teacher(teacher(b.to(device)), forward(b.to(device))).item() for b in batches]
    return sum(kls) / len(kls)


class Diverged(WorkbenchError):
    """The fine-tune overflowed: a one-line error for the CLI, with the schedule and per-step metrics up
    to that point for whoever calls ``remove_ln`` from Python (nothing is written to ``--out``)."""

    def __init__(self, schedule: list[dict[str, Any]], metrics: list[dict[str, Any]], where: str, n_frozen: int,
                 n_sites: int, why: str):
        super().__init__(f"the fine-tune diverged at {where}, {n_frozen} of {n_sites} norms frozen): {why}; "
                         "lower --lr or raise --steps-per-ln")
        self.schedule, self.metrics = schedule, metrics


@dataclass
class Arm:
    """One arm of the comparison: the removal (``remove``) or its control, and how it reports."""

    remove: bool
    positions: SpecialPositions
    label: str = ""
    val: list[Tensor] | None = None  # the removal evaluates before the special positions go off
    ckpt: PhaseCheckpoint | None = None
    on_step: Callable[[int], None] | None = None
    progress: bool = True
    teacher: torch.nn.Module | None = None  # under --objective kl|mix: the original (norms live) or the control


def _random_window(model, window: Tensor, rc: RemovalConfig, positions: SpecialPositions, watch: LossWatch,
                   world: int) -> dict[str, float]:
    """Forward and backward of ``--random-penalty``'s term on a random-token window (no language loss: there
    is nothing to predict); returns the term and the window's largest final-residual |entry|."""
    positions.update(window)
    watch.clear()
    sync = contextlib.nullcontext() if world == 1 or not hasattr(model, "no_sync") else model.no_sync()
    with sync:  # the corpus batch's last backward all-reduces both
        with autocast(window.device, resolve_dtype(rc.runtime.dtype, window.device)):
            model(window)
            term = watch.random_term(positions)
        if term.requires_grad:
            term.backward()
    return {"random_penalty": term.detach().float().item(),
            "random_peak": watch.final[-1].detach().abs().max().float().item()}


def _accumulate(model, batch: Tensor, rc: RemovalConfig, positions: SpecialPositions, watch: LossWatch,
                world: int, teacher: torch.nn.Module | None = None) -> dict[str, Any]:
    """Forward and backward over ``batch`` in micro-batches; returns the batch's mean cross-entropy
    (``loss``), objective (``total``), KL to the original (``kl``, when distilling) and the largest |entry|
    of the final residual (``peak``: where an overflow shows first)."""
    chunks = batch.split(rc.optimization.micro_batch or len(batch))
    out: dict[str, Any] = {"loss": 0.0, "total": 0.0, "kl": 0.0 if teacher is not None else None, "peak": 0.0}
    for j, chunk in enumerate(chunks):
        positions.update(chunk)
        watch.clear()
        last = j == len(chunks) - 1
        sync = contextlib.nullcontext() if last or world == 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(chunk.device, resolve_dtype(rc.runtime.dtype, chunk.device)):
                logits = model(chunk).float()
                loss = lm_cross_entropy(logits, chunk)
                kl = None
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(chunk).float()
                    kl = kl_to_teacher(target, logits)
                total = watch.objective(rc.losses.language_loss(loss, kl), positions)
            weight = len(chunk) / len(batch)
            (total * weight).backward()  # always: under DDP every rank must join the all-reduce
        out["peak"] = max(out["peak"], watch.final[-1].detach().abs().max().float().item())
        out["loss"] = out["loss"] + loss.detach() * weight
        out["total"] = out["total"] + total.detach() * weight
        if kl is not None:
            out["kl"] = out["kl"] + kl.detach() * weight
    return out


def _mean_over_ranks(value: Tensor, world: int) -> float:
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value.item()


def _optimizer(module: torch.nn.Module, rc: RemovalConfig, lr: float) -> torch.optim.Optimizer:
    return adamw(module, lr, rc.optimization.weight_decay, betas=(0.9, 0.95))


def _observed(frozen: list[FrozenStandardize]) -> dict[str, float]:
    """What the hand-overs reported on the last forward, each key averaged over the norms reporting it."""
    seen: dict[str, list[float]] = {}
    for f in frozen:
        for k, v in f.observed.items():
            seen.setdefault(k, []).append(v.item())
    return {k: sum(v) / len(v) for k, v in seen.items()}


class _Loop:
    """One arm's fine-tune: the plan of events, its resumable state and the step."""

    def __init__(self, adapter, data: TokenData, rc: RemovalConfig, lr: float, device: torch.device, arm: Arm):
        self.adapter, self.data, self.rc, self.lr, self.device, self.arm = adapter, data, rc, lr, device, arm
        self.group: Dist = current()
        events = [*adapter.sites, SPECIAL_OFF]
        self.K = rc.schedule.steps_per_ln
        self.bs = rc.optimization.batch_size(adapter.n_ctx, self.group.world)
        self.net = adapter.net
        self.model = self._distribute()
        self.opt = _optimizer(self.net, rc, lr)
        self.watch = rc.losses.watch(adapter)
        self.frozen: list[FrozenStandardize] = []
        pre = rc.schedule.precondition
        self.removal_steps = pre + len(events) * self.K
        self.final_steps = rc.final_steps(len(events))
        self.plan = ([(PRECONDITION, pre)] if pre else []) + [(e, self.K) for e in events] + \
            ([(COOL_DOWN, self.final_steps)] if self.final_steps else [])
        self.saved = arm.ckpt.load() if arm.ckpt is not None else None
        saved = self.saved or {}
        self.start = saved.get("step", 0)
        self.schedule: list[dict[str, Any]] = list(saved.get("schedule", []))
        self.metrics: list[dict[str, Any]] = list(saved.get("metrics", []))
        self.skipped_in_a_row, self.skipped = saved.get("skipped_in_a_row", 0), saved.get("skipped", 0)
        self.restored = self.saved is None
        self.special_off: int | None = None  # the step at which the special positions began losing their own σ
        self.handover = rc.handover.build()

    def _distribute(self):
        if self.rc.runtime.fsdp:
            from torch.distributed.fsdp import fully_shard

            for unit in self.adapter.shard_units():  # one all-gather per block, then the rest of the model
                fully_shard(unit)
            fully_shard(self.net)
            return self.net
        return torch.nn.parallel.DistributedDataParallel(self.net) if self.group.world > 1 else self.net

    def restore(self) -> None:
        """Once every event begun before the checkpoint is installed again: its weights and optimizer."""
        if not self.restored:
            self.net.load_state_dict(self.saved["model"])
            load_state(self.opt, self.saved["optimizer"])
            self.restored = True
            # as the last step before the checkpoint left them: a norm calibrated at this very step sees them
            self.hand_over(self.start - 1)

    def state(self, step: int, done: bool) -> dict[str, Any]:
        return {"step": step, "done": done, "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "schedule": self.schedule, "metrics": self.metrics, "skipped": self.skipped,
                "skipped_in_a_row": self.skipped_in_a_row}

    def hand_over(self, step: int) -> None:
        """Each norm's hand-over progress at ``step``: a function of the step alone, so a resume recomputes it."""
        for f in self.frozen:
            f.hand_over_at(step, self.special_off, self.rc.calibration.special_steps)

    def begin(self, i: int, event, step: int) -> None:
        """Event ``i`` starts at ``step``: calibrate and freeze its norm (or switch the special positions
        off); an event begun before the checkpoint is replayed from its recorded σ."""
        name = event if isinstance(event, str) else event.name
        remove, rank, local = self.arm.remove, self.group.rank, self.bs // self.group.world
        if step < self.start:
            entry = self.schedule[i]
        else:
            entry = {"event": i, "norm": name, "step": step}
            if remove and event == SPECIAL_OFF and self.arm.val is not None:  # what their own σ was still worth
                entry["ce_before"] = evaluate(self.net, self.arm.val, self.arm.positions, self.device)
                self.net.train()
            elif remove and not isinstance(event, str):
                first = self.data.train_batch(step, self.bs, self.adapter.n_ctx, self.rc.optimization.seed)
                first = first[rank * local:(rank + 1) * local]
                entry.update(calibrate(self.adapter, event.norm, first.to(self.device), self.arm.positions,
                                       self.rc.optimization.micro_batch, self.rc.calibration.sigma))
                if not finite(entry):
                    where = f"step {step + 1} ({name}, event {i + 1} of {len(self.plan)}"
                    raise Diverged(self.schedule + [entry], self.metrics, where, len(self.frozen),
                                   len(self.adapter.sites),
                                   "the model overflows on the calibration batch, so its scale is not finite")
            self.schedule.append(entry)
        if remove and event == SPECIAL_OFF:
            self.special_off = entry["step"]
            for f in self.frozen:  # at once, or handed over step by step (``hand_over``)
                f.special = f.special and self.rc.calibration.special_steps > 0
        elif remove and not isinstance(event, str):
            self.frozen.append(freeze(event.norm, entry, self.arm.positions, self.rc.calibration.ema,
                                      self.handover, entry["step"], self.device, self.rc.handover.guard))

    def step(self, step: int, name: str, where: str) -> int:
        """One optimizer step at ``step`` (its batch, lr and hand-over all functions of the step); returns
        the next step."""
        rc, world = self.rc, self.group.world
        whole = self.data.train_batch(step, self.bs, self.adapter.n_ctx, rc.optimization.seed)  # before sharding
        batch = self.group.share(whole).to(self.device)
        for g in self.opt.param_groups:
            g["lr"] = rc.schedule.lr_at(step, self.removal_steps, self.final_steps, self.lr)
        self.hand_over(step)
        self.opt.zero_grad(set_to_none=True)
        extra = {}
        if self.arm.remove and rc.losses.random_penalty > 0 and self.frozen:
            window = self.random_window(step, whole[:1, :1]).to(self.device)
            extra = _random_window(self.model, window, rc, self.arm.positions, self.watch, world)
        acc = _accumulate(self.model, batch, rc, self.arm.positions, self.watch, world, self.arm.teacher)
        loss, total, peak = acc["loss"], acc["total"] + extra.get("random_penalty", 0.0), acc["peak"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), rc.optimization.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded (DTensor) norm
            grad_norm = grad_norm.full_tensor()
        if world > 1:  # every rank must take the same decision
            total = total.clone()
            dist.all_reduce(total)
        finite_step = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(total))
        if finite_step:
            self.opt.step()
            self.skipped_in_a_row = 0
        else:  # an overflowing loss or gradient: skip this update rather than poison the weights
            self.skipped_in_a_row += 1
            self.skipped += 1
        # recorded for the global batch, as a single process would
        record = {"step": step + 1, "norm": name, "loss": _mean_over_ranks(loss, world), "resid_max": peak,
                  "lr": rc.schedule.lr_at(step, self.removal_steps, self.final_steps, self.lr),
                  "batch": batch_fingerprint(whole), **_observed(self.frozen),
                  **({"kl": _mean_over_ranks(acc["kl"], world)} if acc["kl"] is not None else {}), **extra}
        self.metrics.append({**record, **({} if finite_step else {"skipped": True})})
        if self.skipped_in_a_row > rc.optimization.max_skipped:
            raise Diverged(self.schedule, self.metrics, where, len(self.frozen), len(self.adapter.sites),
                           f"{self.skipped_in_a_row} non-finite losses or gradients in a row")
        self.last_loss = loss
        return step + 1

    def random_window(self, step: int, start: Tensor) -> Tensor:
        """``--random-penalty``'s window at ``step``: uniformly random tokens behind the corpus windows' own
        first token (a sink prefix's), a function of the seed, the step and the rank, so a resume redraws it."""
        seed = self.rc.optimization.seed * 1_000_003 + step * 1009 + self.group.rank
        return random_windows(self.adapter.net.cfg.d_vocab, 1, self.adapter.n_ctx, int(start.flatten()[0]), seed)

    def save(self, step: int, done: bool) -> None:
        self.arm.ckpt.save(self.state(step, done))
        if self.group.world > 1:
            dist.barrier()

    def run(self) -> dict[str, Any]:
        arm, total = self.arm, self.removal_steps + self.final_steps
        if self.saved and arm.progress and self.group.main:
            tqdm.write(f"{arm.label}: resuming at step {self.start} from {arm.ckpt.path}")
        bar = tqdm(total=total, initial=self.start, desc=arm.label, disable=not (arm.progress and self.group.main),
                   dynamic_ncols=True, leave=False, mininterval=0.5)
        self.net.train()
        step = 0
        try:
            for i, (event, n_steps) in enumerate(self.plan):
                name = event if isinstance(event, str) else event.name
                if step >= self.start:
                    self.restore()
                if event != COOL_DOWN:
                    self.begin(i, event, step)
                what = {COOL_DOWN: "cool-down", PRECONDITION: "preconditioning"}.get(
                    name if isinstance(event, str) else "", "removing " + name if arm.remove else "control")
                bar.set_description(f"{arm.label} {what} ({i + 1}/{len(self.plan)})")
                for _ in range(n_steps):
                    if step < self.start:
                        step += 1
                        continue
                    self.restore()
                    step = self.step(step, name, f"step {step + 1} ({name}, event {i + 1} of {len(self.plan)}")
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.last_loss.item():.3f}")
                    if arm.ckpt is not None and arm.ckpt.due(step) and step < total:
                        self.save(step, done=False)
                    if arm.on_step is not None:
                        arm.on_step(step)
            self.restore()  # a checkpoint of a finished phase: nothing left to run
            self.hand_over(step - 1)  # as the last step left them
            if arm.ckpt is not None and self.start < step:
                self.save(step, done=True)
        finally:
            bar.close()
            self.watch.remove()
        self.net.eval()
        return {"schedule": self.schedule, "metrics": self.metrics, "steps": step, "final_steps": self.final_steps,
                "skipped_steps": self.skipped, "tokens": step * self.bs * (self.adapter.n_ctx - 1),
                "batch_size": self.bs, "resumed_from_step": self.start or None,
                "batches": batches_digest([m.get("batch") for m in self.metrics])}


def finetune(adapter, data: TokenData, rc: RemovalConfig, lr: float, device: torch.device, arm: Arm) -> dict[str, Any]:
    """Fine-tune ``adapter.net`` over the schedule; on the removal arm freeze each site at its turn.

    With ``arm.ckpt``, the state is saved every ``ckpt.every`` steps and when the schedule ends, and a saved
    state is resumed: events begun before it are replayed from their recorded σ (no new calibration),
    then weights and optimizer are loaded and the remaining steps run on the same batches."""
    return _Loop(adapter, data, rc, lr, device, arm).run()


def config_record(rc: RemovalConfig) -> dict[str, Any]:
    return rc.flat()


@torch.no_grad()
def gather_into(sharded, plain) -> None:
    """Copy the trained (possibly FSDP-sharded) adapter into its unsharded twin, frozen norms included.
    Every rank must call it; the twin holds the full weights on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not current().main:
        return
    for mine, theirs in zip(plain.sites, sharded.sites):
        mine.norm.standardize = copy.deepcopy(theirs.norm.standardize).cpu()
    plain.net.load_state_dict(state)


def control_copy(adapter):
    """An identical adapter whose norms stay live: the control run."""
    return copy.deepcopy(adapter)


__all__ = ["Arm", "Diverged", "RemovalConfig", "calibrate", "config_record", "control_copy", "evaluate", "evaluate_kl",
           "finetune"]
