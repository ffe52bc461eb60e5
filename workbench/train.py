"""The trainer: AdamW, linear warm-up + cosine decay, gradient clipping, periodic validation.

Reproducible: a fixed seed gives bitwise-identical weights on CPU, and a run resumed from its last
checkpoint ends with the weights of an uninterrupted run (batches depend only on (seed, step) and the
model has no dropout, so no RNG state is saved; the checkpoint holds model, buffers, optimizer and
metrics as safetensors + JSON, never a pickle: ``workbench.checkpoint``). Divergence — a non-finite loss or gradient
— stops the run at the step it happens and keeps the last good checkpoint. Under ``torchrun`` the
global batch is split across ranks (DDP; gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import checkpoint, io
from .config import ModelConfig
from .batches import TokenData, load_token_data
from .errors import WorkbenchError
from .optim import adamw, load_state
from .model import GPT
from .precision import autocast, check_dtype, resolve_dtype, warn_if_emulated
from .presets import get_preset
from . import runtime
from .runtime import Dist, init_distributed, resolve_device, warmup_cosine
from .version import __version__


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 50
    seed: int = 0
    corpus: str = "english"
    dtype: str = "float32"  # or "bfloat16": autocast matmuls, float32 weights/optimizer/loss (workbench.precision)

    def __post_init__(self) -> None:
        check_dtype(self.dtype, allow_auto=False)
        if self.steps <= 0:
            raise WorkbenchError(f"--steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise WorkbenchError(f"batch size must be positive, got {self.batch_size}")
        # Above ~1e37 Adam's step size overflows float32 inside the optimizer (a crash, not a divergence).
        if not 0 < self.lr <= 1e30:
            raise WorkbenchError(f"learning rate must be a positive number no larger than 1e30, got {self.lr}")
        for name in ("eval_every", "eval_batches", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise WorkbenchError(f"{name} must be positive, got {getattr(self, name)}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): warm-up, then cosine to the end."""
        return warmup_cosine(step, self.lr, self.warmup_steps, self.warmup_steps, self.steps - self.warmup_steps,
                             self.min_lr_ratio)


def build_configs(
    norm: str,
    preset: str = "tiny",
    steps: int | None = None,
    seed: int = 0,
    corpus: str = "english",
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    p = get_preset(preset)
    model_kwargs = {**p.model, **(model_overrides or {}), "norm": norm}
    train_kwargs = {**p.train, **(train_overrides or {}), "seed": seed, "corpus": corpus}
    if steps is not None:
        train_kwargs["steps"] = steps
        train_kwargs["warmup_steps"] = min(train_kwargs.get("warmup_steps", 0), max(1, steps // 10))
    try:
        return ModelConfig(**model_kwargs), TrainConfig(**train_kwargs)
    except TypeError as e:
        raise WorkbenchError(f"bad configuration override: {e}") from None


def evaluate(model: GPT, batches: list[torch.Tensor], device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) over ``batches``, in eval mode and float32 whatever the training
    precision: the number then describes the weights every analysis will load, not the bf16 arithmetic."""
    was_training = model.training
    model.eval()
    loss = runtime.evaluate(model, batches, device)
    model.train(was_training)
    return loss


def train(
    norm: str,
    out: str | Path,
    preset: str = "tiny",
    steps: int | None = None,
    seed: int = 0,
    corpus: str = "english",
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    device: str | None = None,
    progress: bool = True,
    data: TokenData | None = None,
    on_step: Callable[[int, float], None] | None = None,
    trust_pickle: bool = False,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Train one model into the run directory ``out`` and return its summary.

    ``dtype`` is the training precision: float32, bfloat16 (autocast over float32 master weights) or
    auto (bfloat16 where ``device`` computes it natively; :mod:`workbench.precision`).

    An existing unfinished run in ``out`` with the same configuration is resumed from its last
    checkpoint; a finished one is an error (pick another directory). A run directory of workbench ≤ 0.1
    holds a pickled ``checkpoint.pt``: it is resumed only with ``trust_pickle`` (and even then read by
    torch's weights-only unpickler); its next checkpoint is written in the safe format.
    """
    check_dtype(dtype)
    ddp = init_distributed()
    dev = resolve_device(device, ddp)  # before the corpus is tokenized: a bad device fails at once
    if ddp.main:
        warn_if_emulated(dtype, dev)
    train_overrides = {**(train_overrides or {}), "dtype": resolve_dtype(dtype, dev)}
    model_cfg, train_cfg = build_configs(norm, preset, steps, seed, corpus, model_overrides, train_overrides)
    out = Path(out)
    state = _agree_on_run_dir(out, model_cfg, train_cfg, ddp, trust_pickle)  # validates before anything is written
    if data is None:
        data = load_token_data(train_cfg.corpus, model_cfg.d_vocab)
    if data.tokenizer.get_vocab_size() != model_cfg.d_vocab:
        raise WorkbenchError(
            f"tokenizer has {data.tokenizer.get_vocab_size()} tokens but the model's d_vocab is {model_cfg.d_vocab}"
        )
    data.check_context(model_cfg.n_ctx)
    if train_cfg.batch_size % ddp.world:
        raise WorkbenchError(f"batch size {train_cfg.batch_size} is not divisible by {ddp.world} processes")

    created = False
    if ddp.main and state is None:
        out.mkdir(parents=True, exist_ok=True)
        created = True
        io.atomic_write_json(out / io.CONFIG_FILE, _config_record(model_cfg, train_cfg))
        io.atomic_write_text(out / io.TOKENIZER_FILE, data.tokenizer.to_str())
    try:
        return _train_loop(out, model_cfg, train_cfg, data, state, ddp, dev, progress, on_step)
    except KeyboardInterrupt:
        raise
    except BaseException:
        # Nothing useful was produced yet: leave no half-made run directory behind.
        if created and not (out / io.CHECKPOINT_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _config_record(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg), "workbench_version": __version__}


def _agree_on_run_dir(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, ddp: Dist, trust_pickle: bool):
    """Rank 0 inspects the run directory; every rank learns the verdict (an error or what to resume)."""
    verdict: list[Any] = [None, False]
    state = None
    if ddp.main:
        try:
            state = _prepare_run_dir(out, model_cfg, train_cfg, trust_pickle)
            verdict = [None, state is not None]
        except WorkbenchError as e:
            verdict = [str(e), False]
    if ddp.world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise WorkbenchError(verdict[0])
    if verdict[1] and not ddp.main:
        state = _read_checkpoint(out, trust_pickle)
    return state


def _prepare_run_dir(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     trust_pickle: bool) -> dict[str, Any] | None:
    """Return the checkpoint to resume from, None for a fresh run; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} exists and is not a directory; choose a new directory")
    if not out.exists() or not any(out.iterdir()):
        return None
    if (out / io.SUMMARY_FILE).exists():
        raise WorkbenchError(f"{out} already holds a finished run; choose a new --out directory")
    if not (out / io.CONFIG_FILE).exists():
        raise WorkbenchError(f"{out} is not empty and is not a workbench run; choose a new --out directory")
    saved = io.read_json(out / io.CONFIG_FILE, "run config")
    saved_train = saved.get("train")
    if isinstance(saved_train, dict):
        saved_train = {"dtype": "float32", **saved_train}  # runs of workbench ≤ 0.1 trained in float32
    if saved.get("model") != model_cfg.to_dict() or saved_train != dataclasses.asdict(train_cfg):
        raise WorkbenchError(
            f"{out} holds an unfinished run with a different configuration; resume it with the same "
            "arguments or choose a new --out directory"
        )
    return _read_checkpoint(out, trust_pickle)


def _read_checkpoint(out: Path, trust_pickle: bool) -> dict[str, Any] | None:
    """The run's last checkpoint (None if it has none); a legacy pickle only when the user trusts it."""
    if (out / io.CHECKPOINT_FILE).exists():
        return checkpoint.load(out / io.CHECKPOINT_FILE)
    if (out / io.LEGACY_CHECKPOINT_FILE).exists():
        return checkpoint.load_legacy(out / io.LEGACY_CHECKPOINT_FILE, trust_pickle)
    return None


def _train_loop(out, model_cfg, train_cfg, data, state, ddp, dev, progress, on_step) -> dict[str, Any]:
    model, optimizer, start, metrics, seconds = _init_model(out, model_cfg, train_cfg, data, state, dev)
    resumed_from = start
    model.train()
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    val_batches = data.val_batches(train_cfg.eval_batches, train_cfg.batch_size, model_cfg.n_ctx)

    if ddp.main and not (out / io.CHECKPOINT_FILE).exists():  # fresh, or resumed from a legacy pickle
        _save_checkpoint(out, model, optimizer, start, metrics, seconds)  # there is always a last good checkpoint
    bar = tqdm(total=train_cfg.steps, initial=start, desc=f"train {model_cfg.norm}", disable=not (progress and ddp.main),
               dynamic_ncols=True, leave=False, mininterval=1.0)
    t0 = time.perf_counter()
    diverged: dict[str, Any] | None = None
    for step in range(start, train_cfg.steps):
        record, divergence = _train_step(step, model, ddp_model, optimizer, data, train_cfg, model_cfg.n_ctx, ddp, dev)
        if divergence is not None:
            diverged = {"step": step + 1, "reason": divergence}
            break
        done = record["step"]
        if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
            record["val_loss"] = evaluate(model, val_batches, dev)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record['val_loss']:.3f}")
        metrics.append(record)
        bar.update(1)
        if on_step is not None:
            on_step(done, record["train_loss"])
        if ddp.main and (done % train_cfg.ckpt_every == 0 or done == train_cfg.steps):
            _save_checkpoint(out, model, optimizer, done, metrics, seconds + time.perf_counter() - t0)
    bar.close()
    seconds += time.perf_counter() - t0
    if ddp.world > 1:
        dist.barrier()
    return _finish(out, model, train_cfg, data, metrics, seconds, diverged, ddp, resumed_from)


def _init_model(out, model_cfg, train_cfg, data, state, dev):
    """The seeded model and its optimizer, with the checkpoint ``state`` loaded when resuming; returns them
    with the step, metrics and seconds to carry on from."""
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg, data.tokenizer).to(dev)
    optimizer = adamw(model, train_cfg.lr, train_cfg.weight_decay, betas=(train_cfg.beta1, train_cfg.beta2))
    start, metrics, seconds = 0, [], 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            load_state(optimizer, state["optimizer"])
            start, metrics, seconds = int(state["step"]), list(state["metrics"]), float(state["seconds"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise WorkbenchError(
                f"checkpoint in {out} does not fit this run ({e.__class__.__name__}); delete {out} and re-train"
            ) from None
    return model, optimizer, start, metrics, seconds


def _train_step(step, model, ddp_model, optimizer, data, train_cfg, n_ctx, ddp,
                dev) -> tuple[dict[str, Any] | None, str | None]:
    """One optimizer step on the batch of ``step``: its metrics record, or (None, why) when the loss or
    gradient is not finite — then the weights are left as they were."""
    batch = data.train_batch(step, train_cfg.batch_size, n_ctx, train_cfg.seed)
    batch = ddp.share(batch).to(dev)
    for group in optimizer.param_groups:
        group["lr"] = train_cfg.lr_at(step)
    with autocast(dev, train_cfg.dtype):
        loss = ddp_model(batch, return_type="loss")
    global_loss = loss.detach().clone()
    if ddp.world > 1:
        dist.all_reduce(global_loss)
        global_loss /= ddp.world
    if not torch.isfinite(global_loss):
        return None, "non-finite loss"
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
    if not torch.isfinite(grad_norm):
        return None, "non-finite gradient"
    optimizer.step()
    return {"step": step + 1, "train_loss": global_loss.item(), "lr": train_cfg.lr_at(step),
            "grad_norm": grad_norm.item()}, None


def _save_checkpoint(out, model, optimizer, step, metrics, seconds) -> None:
    checkpoint.save(
        out / io.CHECKPOINT_FILE,
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "metrics": metrics,
         "seconds": seconds},
    )
    # A resumed legacy run now has a safe checkpoint; the pickle must not be what the next resume reads.
    (out / io.LEGACY_CHECKPOINT_FILE).unlink(missing_ok=True)
    io.atomic_write_text(out / io.METRICS_FILE, "".join(_jsonl(m) for m in metrics))


def _jsonl(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


def _finish(out, model, train_cfg, data, metrics, seconds, diverged, ddp, resumed_from) -> dict[str, Any]:
    model_cfg = model.cfg
    val = [m for m in metrics if "val_loss" in m]
    summary: dict[str, Any] = {
        "norm": model_cfg.norm,
        "final_val_loss": val[-1]["val_loss"] if val and not diverged else None,
        "steps": metrics[-1]["step"] if metrics else 0,
        "tokens": (metrics[-1]["step"] if metrics else 0) * train_cfg.batch_size * (model_cfg.n_ctx - 1),
        "seconds": round(seconds, 3),
        "diverged": diverged is not None,
        "seed": train_cfg.seed,
        "corpus": train_cfg.corpus,
        "dtype": train_cfg.dtype,
        "n_params": sum(p.numel() for p in model.parameters()),
        "unigram_val_loss": data.unigram_cross_entropy(),
        "world_size": ddp.world,
        "resumed_from_step": resumed_from,
    }
    if diverged:
        ckpt = out / io.CHECKPOINT_FILE
        good = checkpoint.load(ckpt) if ckpt.exists() else None
        summary.update(diverged_at_step=diverged["step"], divergence=diverged["reason"],
                       weights_from_step=good["step"] if good else None,
                       last_val_loss=val[-1]["val_loss"] if val else None)
        if ddp.main and good is not None:
            model.load_state_dict(good["model"])
            io.save_weights(model, out / io.MODEL_FILE)
    elif ddp.main:
        io.save_weights(model, out / io.MODEL_FILE)
    if ddp.main:
        io.atomic_write_text(out / io.METRICS_FILE, "".join(_jsonl(m) for m in metrics))
        io.atomic_write_json(out / io.SUMMARY_FILE, summary)
    return summary
