"""The removal fine-tune: freeze one norm at a time, K steps in between, and a control run with LN kept.

Works on any model exposed through a *removal adapter*: ``net`` (the module trained; called with
tokens, returns logits), ``sites`` (its norms in removal order, each a ``workbench.norms.Norm``),
``final_norm``, ``eot_id``, ``n_ctx`` and ``fold()`` (the norm-free model once all are frozen).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from ..data import TokenData, batch_fingerprint, batches_digest
from ..errors import WorkbenchError
from ..model.gpt import lm_cross_entropy
from ..norms.frozen import FrozenStandardize, SpecialPositions
from ..optim import adamw
from ..precision import autocast, check_dtype, resolve_dtype
from .losses import LossWatch
from .resume import DEFAULT_EVERY, PhaseCheckpoint
from .schedule import SPECIAL_OFF

BRIDGES = ("none", "clip", "taper")


def _opt(default: Any, help: str, flag: str | None = None) -> Any:
    """A field that is also a ``remove-ln`` flag: its default and help are written here only."""
    return field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


@dataclass
class RemovalConfig:
    steps_per_ln: int = _opt(2, "fine-tuning steps after each norm is frozen (K)")
    tokens_per_step: int = _opt(1024, "tokens per optimizer step: the global batch, rounded down to whole sequences")
    lr: float | None = _opt(None, "learning rate (default: the family's, else 0.4 × the pre-training peak, "
                                  "else 6e-4)")
    warmup_steps: int = 5
    micro_batch: int | None = _opt(None, "sequences per forward pass (gradient accumulation; default: all at once)")
    # After the last removal: a cool-down with cosine decay to lr·min_lr_ratio.
    final_steps: int | None = _opt(None, "cool-down steps after the last removal (default: 30 % of the removal "
                                         "steps, at least the longest hand-over)")
    min_lr_ratio: float = 0.1
    max_skipped: int = 5  # steps with a non-finite gradient are skipped; more than this many in a row is divergence
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # "median" is robust to a few tokens with massive activations; with "qNN" most tokens are scaled
    # down and almost none up.
    sigma: str = _opt("rms", "frozen std from the ordinary tokens' scales: rms (pooled std), median, or qNN "
                             "(percentile)")
    special_positions: int = _opt(1, "the first N positions keep their own std until the last event (with "
                                     "end-of-text tokens; 1: BOS)")
    aux_loss: float = _opt(0.0, "weight of the final-residual std-uniformity loss")
    # Teaches the model to stop relying on a few high-norm tokens before one σ replaces their scale.
    scale_loss: float = _opt(0.0, "weight of a loss on the spread of log per-token scale at every norm")
    precondition: int = _opt(0, "steps with --scale-loss and every norm live before the first is frozen")
    ema: float = _opt(0.0, "EMA rate of the frozen std towards the live scale while fine-tuning (0: fixed)")
    seed: int = 1  # batch seed; pre-training used seed 0's batches
    eval_batches: int = 16
    eval_batch_size: int = 8
    control: bool = _opt(True, "skip the control run (norms kept)", flag="--no-control")
    ramp: int = _opt(0, "hand each norm over from its live scale to the frozen one over R steps (geometric; "
                        "0: at once)")
    fsdp: bool = _opt(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead "
                             "of DDP")
    # Evaluations are always float32.
    dtype: str = _opt("auto", "float32 | bfloat16 (autocast over float32 weights) | auto (bfloat16 where the "
                              "device computes it natively, else float32)")
    # While the gate's input stays live, the MLP grows like ‖x‖, not ‖x‖².
    split_mlp: bool = _opt(False, "gated MLPs: the up path's input gets its own norm, frozen first; the gate's "
                                  "stays live until last")
    mlp_penalty: float = _opt(0.0, "weight of a one-sided penalty on per-position scales above (1+δ)·σ at "
                                   "MLP-norm inputs not yet frozen")
    penalty_delta: float = _opt(0.1, "δ of --mlp-penalty")
    bridge: str = _opt("none", "hand-over to the frozen scale: none, clip (only positions above σ stay "
                               "normalized, annealed away) or taper (outputs blended, cosine to 0)")
    bridge_steps: int = _opt(0, "steps over which --bridge is annealed away")
    special_steps: int = _opt(0, "hand the special positions (BOS, EOT) over to the shared σ over N steps "
                                 "(0: at once)")
    checkpoint_every: int | None = _opt(None, "save a resumable checkpoint to OUT.partial every N steps (default "
                                              f"{DEFAULT_EVERY}, 0 under --fsdp; 0: off); the same command "
                                              "resumes it")

    def __post_init__(self) -> None:
        if self.steps_per_ln <= 0:
            raise WorkbenchError(f"--steps-per-ln must be at least 1, got {self.steps_per_ln}")
        if self.tokens_per_step <= 0:
            raise WorkbenchError(f"--tokens-per-step must be positive, got {self.tokens_per_step}")
        # Above ~1e37 Adam's step size overflows float32 inside the optimizer (a crash, not a divergence).
        if self.lr is not None and not 0 < self.lr <= 1e30:
            raise WorkbenchError(f"--lr must be a positive number no larger than 1e30, got {self.lr}")
        if self.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise WorkbenchError("--fsdp shards the model across processes: run it under torchrun with at least 2")
        if self.ramp < 0:
            raise WorkbenchError(f"--ramp must be ≥ 0, got {self.ramp}")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise WorkbenchError(f"--micro-batch must be positive, got {self.micro_batch}")
        if not (self.sigma in ("rms", "median") or _percentile(self.sigma) is not None):
            raise WorkbenchError(f"--sigma must be rms, median or qNN (a percentile, e.g. q99), got {self.sigma!r}")
        if self.special_positions < 1:
            raise WorkbenchError(f"--special-positions must be at least 1 (position 0), got {self.special_positions}")
        if self.final_steps is not None and self.final_steps < 0:
            raise WorkbenchError(f"--final-steps must be ≥ 0, got {self.final_steps}")
        if self.scale_loss < 0 or self.precondition < 0:
            raise WorkbenchError("--scale-loss and --precondition must be ≥ 0")
        if self.aux_loss < 0:
            raise WorkbenchError(f"--aux-loss must be ≥ 0, got {self.aux_loss}")
        check_dtype(self.dtype)
        if self.mlp_penalty < 0:
            raise WorkbenchError(f"--mlp-penalty must be ≥ 0, got {self.mlp_penalty}")
        if not 0 <= self.penalty_delta < 1e6:
            raise WorkbenchError(f"--penalty-delta δ must be ≥ 0 (positions above (1 + δ)·σ are penalised), got "
                                 f"{self.penalty_delta}")
        if self.bridge not in BRIDGES:
            raise WorkbenchError(f"--bridge must be one of {', '.join(BRIDGES)}, got {self.bridge!r}")
        if self.bridge != "none" and self.bridge_steps <= 0:
            raise WorkbenchError(f"--bridge {self.bridge} needs --bridge-steps N ≥ 1 (the steps over which it is "
                                 "annealed away)")
        if self.bridge == "none" and self.bridge_steps:
            raise WorkbenchError("--bridge-steps needs --bridge clip or --bridge taper")
        if self.bridge != "none" and self.ramp:
            raise WorkbenchError("--ramp and --bridge are two hand-overs; choose one")
        if self.special_steps < 0:
            raise WorkbenchError(f"--special-steps must be ≥ 0 (0: switch the special positions off at once), got "
                                 f"{self.special_steps}")
        if self.checkpoint_every is None:
            self.checkpoint_every = 0 if self.fsdp else DEFAULT_EVERY
        if self.checkpoint_every < 0:
            raise WorkbenchError(f"--checkpoint-every must be ≥ 0 (0: no checkpoints), got {self.checkpoint_every}")
        if self.fsdp and self.checkpoint_every:
            raise WorkbenchError("--checkpoint-every is not supported with --fsdp (sharded state); pass --checkpoint-every 0")
        if not 0.0 <= self.ema < 1.0:
            raise WorkbenchError(f"--ema must lie in [0, 1), got {self.ema}")

    def cooldown(self, removal_steps: int) -> int:
        return int(0.3 * removal_steps) if self.final_steps is None else self.final_steps

    def batch_size(self, n_ctx: int, world: int = 1) -> int:
        b = max(1, self.tokens_per_step // n_ctx)
        return max(world, b - b % world)


def _percentile(statistic: str) -> float | None:
    try:
        q = float(statistic[1:]) if statistic.startswith("q") else None
    except ValueError:
        return None
    return q if q is not None and 0 < q < 100 else None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(forward: Callable[[Tensor], Tensor], batches: list[Tensor], positions: SpecialPositions | None,
             device: torch.device) -> float:
    losses = []
    for b in batches:
        b = b.to(device)
        if positions is not None:
            positions.update(b)
        losses.append(lm_cross_entropy(forward(b), b).item())
    return sum(losses) / len(losses)


@torch.no_grad()
def calibrate(adapter, norm, batch: Tensor, positions: SpecialPositions, chunk: int | None = None,
              statistic: str = "rms") -> dict[str, float | None]:
    """σ from the live per-token scale s_t: over ordinary positions sqrt(mean s_t²) ("rms") or
    median s_t ("median"); BOS and EOT positions pooled separately (always rms)."""
    stats = torch.zeros(3, 2, dtype=torch.float64, device=batch.device)
    ordinary_scales: list[Tensor] = []
    for part in batch.split(chunk or len(batch)):
        captured: list[Tensor] = []
        norm.hook_scale.add_hook(lambda act, hook: captured.append(act.detach().float()))
        try:
            positions.update(part)
            adapter.net(part)
        finally:
            norm.hook_scale.remove_hooks("fwd")
        s = captured[0].expand(*part.shape, 1)
        masks = (positions.ordinary(), positions.bos, positions.eot)
        stats += torch.stack([torch.stack([(s.pow(2) * m).sum(), m.sum().float()]) for m in masks]).double()
        ordinary_scales.append(s[masks[0]].double().cpu())
    world = _world()[1]
    if world > 1:
        dist.all_reduce(stats)
    out = {k: (math.sqrt(s / n) if n > 0 else None) for k, (s, n) in zip(("sigma", "sigma_bos", "sigma_eot"), stats.tolist())}
    if statistic != "rms":
        local = torch.cat(ordinary_scales)
        if world > 1:
            everyone: list = [None] * world
            dist.all_gather_object(everyone, local)
            local = torch.cat(everyone)
        q = _percentile(statistic)
        value = local.median().item() if q is None else torch.quantile(local, q / 100).item()
        out["sigma_rms"], out["sigma"] = out["sigma"], value
    return out


def _accumulate(model, batch: Tensor, rc: RemovalConfig, positions: SpecialPositions, watch: LossWatch,
                world: int) -> tuple[Tensor, Tensor, float]:
    """Forward and backward over ``batch`` in micro-batches; returns the batch's mean loss, objective and
    the largest |entry| of the final residual (where an overflow shows first)."""
    chunks = batch.split(rc.micro_batch or len(batch))
    loss_sum, total_sum, peak = 0.0, 0.0, 0.0
    for j, chunk in enumerate(chunks):
        positions.update(chunk)
        watch.clear()
        last = j == len(chunks) - 1
        sync = contextlib.nullcontext() if last or world == 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(chunk.device, resolve_dtype(rc.dtype, chunk.device)):
                loss = lm_cross_entropy(model(chunk).float(), chunk)
                total = watch.objective(loss, positions)
            weight = len(chunk) / len(batch)
            (total * weight).backward()  # always: under DDP every rank must join the all-reduce
        peak = max(peak, watch.final[-1].detach().abs().max().float().item())
        loss_sum = loss_sum + loss.detach() * weight
        total_sum = total_sum + total.detach() * weight
    return loss_sum, total_sum, peak


def _optimizer(module: torch.nn.Module, rc: RemovalConfig, lr: float) -> torch.optim.Optimizer:
    return adamw(module, lr, rc.weight_decay, betas=(0.9, 0.95))


def _lr_at(step: int, removal_steps: int, final_steps: int, rc: RemovalConfig, lr: float) -> float:
    """Linear warm-up, constant while norms are being removed (each removal needs the same room to
    adapt), then a cosine cool-down over the final steps."""
    if step < rc.warmup_steps:
        return lr * (step + 1) / rc.warmup_steps
    if step < removal_steps or final_steps == 0:
        return lr
    progress = (step - removal_steps + 1) / final_steps
    return lr * (rc.min_lr_ratio + (1 - rc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _freeze(event, entry: dict[str, Any], rc: RemovalConfig, positions: SpecialPositions,
            device: torch.device) -> FrozenStandardize:
    """Swap the site's live standardization for a frozen one at the entry's calibrated σ."""
    st = FrozenStandardize(entry["sigma"], event.norm.standardize.centers, positions,
                           entry["sigma_bos"], entry["sigma_eot"] or entry["sigma_bos"], rc.ema)
    bridge = "ramp" if rc.ramp else rc.bridge
    if bridge != "none":
        eps = getattr(event.norm.standardize, "eps", None)
        if eps is None or type(event.norm.standardize).__name__ == "CRMSStandardize":
            raise WorkbenchError(f"--{'ramp' if rc.ramp else 'bridge'} needs a LayerNorm or RMSNorm (a live scale "
                                 "sqrt(mean x² + eps))")
        st.bridge, st.live_eps, st.blend = bridge, float(eps), 0.0
        st.frozen_at = entry["step"]
    event.norm.standardize = st.to(device)
    return st


class Diverged(WorkbenchError):
    """The fine-tune overflowed: a one-line error for the CLI, with the schedule and per-step metrics up
    to that point for whoever calls ``remove_ln`` from Python (nothing is written to ``--out``)."""

    def __init__(self, schedule: list[dict[str, Any]], metrics: list[dict[str, Any]], where: str, n_frozen: int,
                 n_sites: int, why: str):
        super().__init__(f"the fine-tune diverged at {where}, {n_frozen} of {n_sites} norms frozen): {why}; "
                         "lower --lr or raise --steps-per-ln")
        self.schedule, self.metrics = schedule, metrics


def _hand_over(frozen: list[FrozenStandardize], step: int, rc: RemovalConfig, special_off: int | None) -> None:
    """Each bridged norm's progress at ``step``, and the special positions': functions of the step alone,
    so a resume recomputes them."""
    for f in frozen:
        if f.live_eps is not None:
            f.blend = min(1.0, (step - f.frozen_at + 1) / (rc.ramp or rc.bridge_steps))
        if special_off is not None and f.special:
            f.special_blend = min(1.0, (step - special_off + 1) / rc.special_steps)
            f.special = f.special_blend < 1.0


def finetune(adapter, data: TokenData, rc: RemovalConfig, lr: float, device: torch.device, remove: bool,
             positions: SpecialPositions, progress: bool = True, label: str = "",
             val: list[Tensor] | None = None, ckpt: PhaseCheckpoint | None = None,
             on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``adapter.net`` over the schedule; with ``remove`` freeze each site at its turn.

    With ``ckpt``, the state is saved every ``ckpt.every`` steps and when the schedule ends, and a saved
    state is resumed: events begun before it are replayed from their recorded σ (no new calibration),
    then weights and optimizer are loaded and the remaining steps run on the same batches."""
    rank, world = _world()
    events = [*adapter.sites, SPECIAL_OFF]
    K, bs = rc.steps_per_ln, rc.batch_size(adapter.n_ctx, world)
    local = bs // world
    net = adapter.net
    if rc.fsdp:
        from torch.distributed.fsdp import fully_shard

        for unit in adapter.shard_units():  # one all-gather per block, then the rest of the model
            fully_shard(unit)
        fully_shard(net)
        model = net
    else:
        model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = _optimizer(net, rc, lr)
    watch = LossWatch(adapter, aux=rc.aux_loss, scale=rc.scale_loss, mlp=rc.mlp_penalty, delta=rc.penalty_delta)
    frozen: list[FrozenStandardize] = []
    removal_steps = rc.precondition + len(events) * K
    # every hand-over completes before the fold
    final_steps = max(rc.cooldown(len(events) * K), rc.ramp, rc.bridge_steps, rc.special_steps)
    plan = ([("precondition", rc.precondition)] if rc.precondition else []) + [(e, K) for e in events] + \
        ([("final", final_steps)] if final_steps else [])
    saved = ckpt.load() if ckpt is not None else None
    start = saved["step"] if saved else 0
    schedule: list[dict[str, Any]] = list(saved["schedule"]) if saved else []
    metrics: list[dict[str, Any]] = list(saved["metrics"]) if saved else []
    skipped_in_a_row, skipped = (saved["skipped_in_a_row"], saved["skipped"]) if saved else (0, 0)
    restored = saved is None
    special_off: int | None = None  # the step at which the special positions began losing their own σ
    if saved and progress and rank == 0:
        tqdm.write(f"{label}: resuming at step {start} from {ckpt.path}")

    def restore() -> None:  # once every event begun before the checkpoint is installed again
        nonlocal restored
        if not restored:
            net.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            restored = True

    def state(step: int, done: bool) -> dict[str, Any]:
        return {"step": step, "done": done, "model": net.state_dict(), "optimizer": opt.state_dict(),
                "schedule": schedule, "metrics": metrics, "skipped": skipped, "skipped_in_a_row": skipped_in_a_row}

    bar = tqdm(total=removal_steps + final_steps, initial=start, desc=label, disable=not (progress and rank == 0),
               dynamic_ncols=True, leave=False, mininterval=0.5)
    net.train()
    step = 0
    try:
        for i, (event, n_steps) in enumerate(plan):
            name = event if isinstance(event, str) else event.name
            replay = step < start  # begun before the checkpoint: its σ is on record
            if not replay:
                restore()
            if event != "final":
                if replay:
                    entry = schedule[i]
                else:
                    entry = {"event": i, "norm": name, "step": step}
                    if remove and event == SPECIAL_OFF and val is not None:  # what their own σ was still worth
                        entry["ce_before"] = evaluate(net, val, positions, device)
                        net.train()
                    elif remove and not isinstance(event, str):
                        first = data.train_batch(step, bs, adapter.n_ctx, rc.seed)[rank * local:(rank + 1) * local]
                        entry.update(calibrate(adapter, event.norm, first.to(device), positions, rc.micro_batch, rc.sigma))
                        if not all(math.isfinite(v) for k, v in entry.items() if k.startswith("sigma") and v is not None):
                            where = f"step {step + 1} ({name}, event {i + 1} of {len(plan)}"
                            raise Diverged(schedule + [entry], metrics, where, len(frozen), len(adapter.sites),
                                           "the model overflows on the calibration batch, so its scale is not finite")
                    schedule.append(entry)
                if remove and event == SPECIAL_OFF:
                    special_off = entry["step"]
                    for f in frozen:
                        f.special = f.special and rc.special_steps > 0  # else: handed over by _hand_over
                elif remove and not isinstance(event, str):
                    frozen.append(_freeze(event, entry, rc, positions, device))
            what = {"final": "cool-down", "precondition": "preconditioning"}.get(
                name if isinstance(event, str) else "", "removing " + name if remove else "control")
            bar.set_description(f"{label} {what} ({i + 1}/{len(plan)})")
            for k in range(n_steps):
                if step < start:
                    step += 1
                    continue
                restore()
                whole = data.train_batch(step, bs, adapter.n_ctx, rc.seed)  # the global batch, before sharding
                batch = whole[rank * local:(rank + 1) * local].to(device)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, removal_steps, final_steps, rc, lr)
                _hand_over(frozen, step, rc, special_off)
                opt.zero_grad(set_to_none=True)
                loss, total, peak = _accumulate(model, batch, rc, positions, watch, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), rc.grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded (DTensor) norm
                    grad_norm = grad_norm.full_tensor()
                if world > 1:  # every rank must take the same decision
                    total = total.clone()
                    dist.all_reduce(total)
                finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(total))
                if finite:
                    opt.step()
                    skipped_in_a_row = 0
                else:  # an overflowing loss or gradient: skip this update rather than poison the weights
                    skipped_in_a_row += 1
                    skipped += 1
                step += 1
                seen = loss.detach().clone()
                if world > 1:  # record the global batch's loss, as a single process would
                    dist.all_reduce(seen)
                    seen /= world
                record = {"step": step, "norm": name, "loss": seen.item(), "resid_max": peak,
                          "lr": _lr_at(step - 1, removal_steps, final_steps, rc, lr), "batch": batch_fingerprint(whole)}
                clipping = [f.clipped.item() for f in frozen if f.clipped is not None]
                if clipping:  # the clip bridge: share of positions still normalized, mean over its norms
                    record["clipped"] = sum(clipping) / len(clipping)
                metrics.append({**record, **({} if finite else {"skipped": True})})
                if skipped_in_a_row > rc.max_skipped:
                    raise Diverged(schedule, metrics, f"step {step} ({name}, event {i + 1} of {len(plan)}",
                                   len(frozen), len(adapter.sites),
                                   f"{skipped_in_a_row} non-finite losses or gradients in a row")
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if ckpt is not None and ckpt.due(step) and step < removal_steps + final_steps:
                    ckpt.save(state(step, done=False))
                    if world > 1:
                        dist.barrier()
                if on_step is not None:
                    on_step(step)
        restore()  # a checkpoint of a finished phase: nothing left to run
        _hand_over(frozen, step - 1, rc, special_off)  # as the last step left them
        if ckpt is not None and start < step:
            ckpt.save(state(step, done=True))
            if world > 1:
                dist.barrier()
    finally:
        bar.close()
        watch.remove()
    net.eval()
    return {"schedule": schedule, "metrics": metrics, "steps": step, "final_steps": final_steps, "skipped_steps": skipped,
            "tokens": step * bs * (adapter.n_ctx - 1), "batch_size": bs, "resumed_from_step": start or None,
            "batches": batches_digest([m.get("batch") for m in metrics])}


def config_record(rc: RemovalConfig) -> dict[str, Any]:
    return asdict(rc)


@torch.no_grad()
def gather_into(sharded, plain) -> None:
    """Copy the trained (possibly FSDP-sharded) adapter into its unsharded twin, frozen norms included.
    Every rank must call it; the twin holds the full weights on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _world()[0] != 0:
        return
    for mine, theirs in zip(plain.sites, sharded.sites):
        mine.norm.standardize = copy.deepcopy(theirs.norm.standardize).cpu()
    plain.net.load_state_dict(state)


def control_copy(adapter):
    """An identical adapter whose norms stay live: the control run."""
    return copy.deepcopy(adapter)


__all__ = ["Diverged", "RemovalConfig", "calibrate", "config_record", "control_copy", "evaluate", "finetune"]
