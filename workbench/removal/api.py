"""``remove_ln``: LayerNorm removal by fine-tuning, with a control run, written atomically to a directory."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..data import TokenData, load_token_data
from ..errors import WorkbenchError
from ..io import check_out_dir
from ..model import GPT
from ..norms.frozen import SpecialPositions
from ..precision import resolve_dtype, warn_if_emulated
from ..train import __version__
from .recipes import explain, resolve
from .finetune import RemovalConfig, config_record, control_copy, evaluate, finetune, gather_into
from .gpt_sites import GPTRemoval, check_removable
from .resume import PhaseCheckpoint, discard, partial_dir


def _device(device: str | None) -> torch.device:
    from ..train import init_distributed, resolve_device

    return resolve_device(device, init_distributed())


def _source_record(spec: str | Path | GPT) -> dict[str, Any]:
    """What the source run says about itself (corpus, pre-training tokens, learning rate)."""
    if not isinstance(spec, (str, Path)) or not (Path(spec) / io.CONFIG_FILE).is_file():
        return {}
    d = Path(spec)
    rec: dict[str, Any] = {}
    cfg = io.read_json(d / io.CONFIG_FILE, "model config")
    train = cfg.get("train") or {}
    rec["corpus"] = train.get("corpus")
    rec["lr"] = train.get("lr")
    if (d / io.SUMMARY_FILE).is_file():
        rec["tokens"] = io.read_json(d / io.SUMMARY_FILE, "run summary").get("tokens")
    return rec


def load_source(spec: str | Path | GPT, device: torch.device) -> GPT:
    """The model to transform: already loaded, or any spec ``workbench.load`` takes."""
    from ..loader import load

    return load(spec, device=device) if isinstance(spec, (str, Path)) else spec.to(device)


def remove_ln(spec: str | Path | GPT, out: str | Path, rc: RemovalConfig | None = None, corpus: str | None = None,
              device: str | None = None, progress: bool = True, data: TokenData | None = None,
              options: dict[str, Any] | None = None, recipe: str | None = None) -> dict[str, Any]:
    """Remove every norm of a Pre-norm model by fine-tuning; write the LN-free model, a control run and
    ``summary.json`` to ``out``. Returns the summary.

    The method is ``rc`` as given, or (without ``rc``) the recipe for the model's capabilities — or the
    one named by ``recipe`` — with the family's defaults and then ``options`` (RemovalConfig fields) on top."""
    from ..train import init_distributed

    from ..loader import family_named

    if rc is not None and (options or recipe):
        raise WorkbenchError("give either a RemovalConfig or a recipe and options, not both")
    out = Path(out)
    check_out_dir(out)
    ddp = init_distributed()  # under torchrun: DDP over the global batch (gloo on CPU, nccl on GPU)
    dev = _device(device)
    model = load_source(spec, dev)
    family = family_named(model.cfg.family)  # None: the workbench's own models
    defaults = family.removal_defaults if family is not None else {}
    chosen = None
    if rc is None:
        rc, _, chosen = resolve(model.cfg, options or {}, recipe, defaults)
    if ddp.main:
        warn_if_emulated(rc.dtype, dev)
    rc = dataclasses.replace(rc, dtype=resolve_dtype(rc.dtype, dev))  # the summary records what ran
    check_removable(model.cfg)
    if model.tokenizer is None:
        raise WorkbenchError("the model has no tokenizer; remove-ln needs one to read the fine-tuning corpus")
    source = _source_record(spec)
    corpus = corpus or source.get("corpus") or "english"
    if data is None:
        data = load_token_data(corpus, model.cfg.d_vocab, tokenizer=model.tokenizer)
    n_ctx = min(model.cfg.n_ctx, defaults.get("n_ctx", model.cfg.n_ctx))
    data.check_context(n_ctx)
    lr = rc.lr or defaults.get("lr") or 0.4 * (source.get("lr") or 6e-4)
    t0 = time.perf_counter()

    adapter = GPTRemoval(model, n_ctx, split_mlp=rc.split_mlp)
    partial = partial_dir(out)
    fingerprint = {"source": str(spec) if isinstance(spec, (str, Path)) else "<in-memory model>", "corpus": corpus,
                   "n_ctx": n_ctx, "lr": lr, "world_size": ddp.world, "workbench_version": __version__,
                   "config": {k: v for k, v in config_record(rc).items() if k != "checkpoint_every"}}
    ckpts = {phase: PhaseCheckpoint(partial, phase, fingerprint, rc.checkpoint_every, ddp.main)
             for phase in ("removal", "control")} if rc.checkpoint_every else {}
    for c in ckpts.values():
        c.check()
    try:
        summary = _remove(model, adapter, family, source, spec, out, rc, data, corpus, n_ctx, lr, dev, ddp,
                          progress, ckpts, t0, recipe=chosen.name if chosen else None)
    except WorkbenchError:
        if ddp.main:
            discard(partial)  # a diverged or refused run is not resumable: the same command fails the same way
        raise
    if ddp.main:
        discard(partial)
    return summary


def _remove(model, adapter, family, source, spec, out, rc, data, corpus, n_ctx, lr, dev, ddp, progress, ckpts,
            t0, recipe: str | None = None) -> dict[str, Any]:
    control = control_copy(adapter) if rc.control else None
    if control is not None:
        control.net.cpu()  # the control waits on the CPU: the device holds one model while the removal runs
    # FSDP shards the modules in place; unsharded twins (on the CPU) receive the trained weights.
    twin = _cpu_copy(adapter) if rc.fsdp else None
    control_twin = _cpu_copy(control) if rc.fsdp and control is not None else None
    positions = SpecialPositions(adapter.eot_id, rc.special_positions)
    val = data.val_batches(rc.eval_batches, rc.eval_batch_size, n_ctx)
    ce_original = evaluate(model, val, None, dev)
    run = finetune(adapter, data, rc, lr, dev, remove=True, positions=positions, progress=progress, label="remove-ln",
                   val=val, ckpt=ckpts.get("removal"), on_step=_ON_STEP.get("removal"))
    ce_unfolded = evaluate(adapter.net, val, positions, dev)
    plain, plain_dev = adapter, dev
    if rc.fsdp:
        gather_into(adapter, twin)
        plain, plain_dev = twin, torch.device("cpu")
    ln_free, ce_ln_free, fold_diff = None, None, None
    if ddp.main or not rc.fsdp:
        ln_free = plain.fold()
        ce_ln_free = evaluate(ln_free, val, None, plain_dev)
        with torch.no_grad():
            x = val[0].to(plain_dev)
            fold_diff = (ln_free(x) - plain.net(x)).abs().max().item()
    summary: dict[str, Any] = {
        "source": str(spec) if isinstance(spec, (str, Path)) else "<in-memory model>",
        "norm": model.cfg.norm,
        "family": model.cfg.family,
        "n_ctx": n_ctx,
        "ce_original": ce_original,
        "ce_control": None,
        "batches": {"removal": run["batches"], "control": None, "same": None, "first_different_step": None},
        "ce_ln_free": ce_ln_free,
        "ce_ln_free_before_fold": ce_unfolded,
        "fold_max_abs_logit_diff": fold_diff,
        "ce_before_special_off": run["schedule"][-1].get("ce_before"),
        "tokens_used": run["tokens"],
        "pretraining_tokens": source.get("tokens"),
        "token_fraction": run["tokens"] / source["tokens"] if source.get("tokens") else None,
        "steps": run["steps"], "final_steps": run["final_steps"], "skipped_steps": run["skipped_steps"],
        "batch_size": run["batch_size"],
        "resumed_from_step": run["resumed_from_step"],
        **overflow(run["schedule"], run["metrics"], len(adapter.sites)),
        "lr": lr,
        "schedule": run["schedule"],
        "config": config_record(rc),
        "recipe": recipe,  # None: a RemovalConfig given whole
        "corpus": corpus,
        "eval_tokens": sum(b.shape[0] * (b.shape[1] - 1) for b in val),
    }
    metrics = run["metrics"]
    if control is not None:
        cpos = SpecialPositions(adapter.eot_id, rc.special_positions)
        if ln_free is not None:
            ln_free.cpu()  # written from the CPU anyway; the device now holds only the control
        if not rc.fsdp:
            adapter.net.cpu()
        control.net.to(dev)
        crun = finetune(control, data, rc, lr, dev, remove=False, positions=cpos, progress=progress, label="control",
                        ckpt=ckpts.get("control"), on_step=_ON_STEP.get("control"))
        summary["ce_control"] = evaluate(control.net, val, None, dev)
        if ce_ln_free is not None:
            summary["ce_ln_free_minus_control"] = ce_ln_free - summary["ce_control"]
        if rc.fsdp:
            gather_into(control, control_twin)
            control = control_twin
        summary["batches"] = same_batches(run, crun)
        by_step = {m["step"]: m["loss"] for m in crun["metrics"]}
        metrics = [{**m, "control_loss": by_step.get(m["step"])} for m in metrics]
    if model.cfg.norm == "mix-ln":
        summary["note"] = ("mix-ln: the Pre-LN blocks and the final norm were removed; the Post-LN blocks keep "
                           "their live LayerNorm (it normalizes the residual stream itself)")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["world_size"] = ddp.world
    summary["device"] = str(dev)
    summary["dtype"] = rc.dtype
    if ddp.main:
        export = family.export if family is not None and family.removal_output == "export" else None
        _write_result(out, ln_free, control, summary, metrics, rc, export, val)
    if ddp.world > 1:
        torch.distributed.barrier()
    return summary


# Test seam: a callable per phase called after every step (a test raises from it to simulate a kill).
_ON_STEP: dict[str, Any] = {}


def explain_method(spec: str | Path | GPT, options: dict[str, Any] | None = None, recipe: str | None = None) -> str:
    """What ``remove-ln`` would run on ``spec``: the recipe, every field and where its value came from."""
    from ..loader import family_named

    model = load_source(spec, torch.device("cpu"))
    family = family_named(model.cfg.family)
    defaults = family.removal_defaults if family is not None else {}
    rc, source, chosen = resolve(model.cfg, options or {}, recipe, defaults)
    text = explain(rc, source, chosen, asked=recipe not in (None, "auto"))
    if rc.lr is None:
        text += "\n  (lr None: 0.4 × the pre-training peak learning rate, 6e-4 if the run does not record it)"
    return text


def same_batches(run: dict[str, Any], crun: dict[str, Any]) -> dict[str, Any]:
    """Whether the removal and the control trained on the same batches (what makes ΔCE a fair comparison):
    both arms' digests, and the first step whose batch differs."""
    theirs = {m["step"]: m.get("batch") for m in crun["metrics"]}
    differ = [m["step"] for m in run["metrics"] if theirs.get(m["step"]) != m.get("batch")]
    differ += [s for s in theirs if s > run["steps"]]
    return {"removal": run["batches"], "control": crun["batches"],
            "same": not differ and run["batches"] is not None and run["batches"] == crun["batches"],
            "first_different_step": min(differ) if differ else None}


def overflow(schedule: list[dict[str, Any]], metrics: list[dict[str, Any]], n_sites: int) -> dict[str, Any]:
    """Where the first non-finite step fell: how many norms had been frozen before it (all of them when
    none overflowed), for the removal tables."""
    bad = next((m["step"] for m in metrics if m.get("skipped")), None)
    frozen = [e for e in schedule if "sigma" in e]
    before = n_sites if bad is None else sum(1 for e in frozen if e["step"] <= bad - 1)  # metrics count from 1
    return {"first_overflow_step": bad, "norms_frozen_before_overflow": before, "norms_total": n_sites}


@torch.no_grad()
def _stock_ce(directory: Path, val: list[torch.Tensor]) -> float:
    """Validation CE of an exported directory read back by transformers' own classes (no workbench code)."""
    from transformers import AutoModelForCausalLM

    from ..model.gpt import lm_cross_entropy

    hf = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    losses = [lm_cross_entropy(hf(input_ids=b.cpu()).logits, b.cpu()).item() for b in val]
    return sum(losses) / len(losses)


def _cpu_copy(adapter):
    twin = control_copy(adapter)
    twin.net.cpu()
    return twin


def _save_run(d: Path, model: GPT, record: dict[str, Any]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(d / io.CONFIG_FILE, {"model": model.cfg.to_dict(), **record, "workbench_version": __version__})
    io.atomic_write_text(d / io.TOKENIZER_FILE, model.tokenizer.to_str())
    io.save_weights(model, d / io.MODEL_FILE)


def _write_result(out: Path, ln_free: GPT, control, summary, metrics, rc, export=None, val=None) -> None:
    with io.atomic_dir(out) as tmp:
        if export is not None:  # a stock directory of the model's family (e.g. a Llama for SmolLM2)
            # checked on validation text: a norm-free model may overflow on random tokens (docs/ln_removal.md S2)
            summary["export"] = export(ln_free.cpu(), tmp, val[0][:2] if val else None)
            if val is not None:  # what stock transformers computes from the files just written
                summary["ce_stock_reload"] = _stock_ce(tmp, val)
        else:
            _save_run(tmp, ln_free.cpu(), {"train": None, "removal": config_record(rc)})
        if control is not None:
            net = control.net.cpu()
            import dataclasses

            net.cfg = dataclasses.replace(net.cfg, split_ln1_v=True)
            _save_run(tmp / "control", net, {"train": None, "control_of_removal": config_record(rc)})
        io.atomic_write_text(tmp / io.METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))
        io.atomic_write_json(tmp / io.SUMMARY_FILE, summary)


def validation_windows(model: GPT, corpus: str = "english", n: int = 32, seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """Up to ``n`` windows of validation text in the model's own tokenizer (random tokens without one)."""
    from ..corpora import load_corpus
    from ..data import tokenize_works

    n_ctx = min(model.cfg.n_ctx, 128)
    if model.tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, model.cfg.d_vocab, (8, n_ctx), generator=g) for _ in range(max(1, n // 8))], "random tokens (no tokenizer)"
    stream = tokenize_works(model.tokenizer, load_corpus(corpus).val)
    usable = (len(stream) // n_ctx) * n_ctx
    windows = torch.from_numpy(stream[:usable].astype("int64")).reshape(-1, n_ctx)[:n]
    return list(windows.split(8)), f"{corpus} validation split"


def convert_to_dir(spec: str | Path | GPT, to: str, out: str | Path, corpus: str = "english") -> dict[str, Any]:
    """``workbench convert``: the exact transform, checked on validation text, written atomically."""
    from .convert import convert, max_abs_logit_diff

    out = Path(out)
    check_out_dir(out)
    model = load_source(spec, torch.device("cpu"))
    converted = convert(model, to)
    batches, what = validation_windows(model, corpus)
    summary = {"source": str(spec) if isinstance(spec, (str, Path)) else "<in-memory model>", "from": model.cfg.norm,
               "to": to, "norm": converted.cfg.norm, "d_model": converted.cfg.d_model,
               "max_abs_logit_diff": max_abs_logit_diff(model, converted, batches),
               "eval": what, "eval_tokens": sum(b.numel() for b in batches)}
    with io.atomic_dir(out) as tmp:
        record = {"train": None, "converted_from": summary["source"], "conversion": to}
        if converted.tokenizer is not None:
            _save_run(tmp, converted, record)
        else:
            io.atomic_write_json(tmp / io.CONFIG_FILE, {"model": converted.cfg.to_dict(), **record, "workbench_version": __version__})
            io.save_weights(converted, tmp / io.MODEL_FILE)
        io.atomic_write_json(tmp / io.SUMMARY_FILE, summary)
    return summary
