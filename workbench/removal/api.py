"""``remove_ln``: LayerNorm removal by fine-tuning, with a control run, written atomically to a directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..batches import TokenData, load_token_data
from ..errors import WorkbenchError
from ..io import check_out_dir
from ..model import GPT, sink
from ..norms.frozen import SpecialPositions
from ..precision import resolve_dtype, warn_if_emulated
from ..version import __version__
from .recipes import explain, resolve
from .repair import VocabRepair, repair_vocab
from ..runtime import Dist, init_distributed, resolve_device
from .finetune import Arm, config_record, control_copy, evaluate, evaluate_kl, finetune, gather_into
from .method import RemovalConfig
from .gpt_sites import GPTRemoval, check_removable
from .resume import PhaseCheckpoint, discard, partial_dir
from .robustness import robustness


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
    if rc is not None and (options or recipe):
        raise WorkbenchError("give either a RemovalConfig or a recipe and options, not both")
    job = _prepare(spec, Path(out), rc, corpus, device, progress, data, options, recipe)
    partial = partial_dir(job.out)
    fingerprint = {"source": job.source_name, "corpus": job.corpus, "n_ctx": job.n_ctx, "lr": job.lr,
                   "world_size": job.group.world, "workbench_version": __version__,
                   "config": {k: v for k, v in config_record(job.rc).items() if k != "checkpoint_every"}}
    every = job.rc.runtime.checkpoint_every
    job.ckpts = {phase: PhaseCheckpoint(partial, phase, fingerprint, every, job.group.main)
                 for phase in ("removal", "control")} if every else {}
    for c in job.ckpts.values():
        c.check()
    try:
        summary = _remove(job)
    except WorkbenchError:
        if job.group.main:
            discard(partial)  # a diverged or refused run is not resumable: the same command fails the same way
        raise
    if job.group.main:
        discard(partial)
    return summary


@dataclass
class _Job:
    """Everything one ``remove_ln`` call resolved before fine-tuning starts."""

    spec: str | Path | GPT
    out: Path
    model: GPT
    family: Any  # the loader's Family, None for the workbench's own models
    rc: RemovalConfig
    recipe: str | None
    source: dict[str, Any]
    corpus: str
    data: TokenData
    n_ctx: int
    lr: float
    device: torch.device
    group: Dist
    progress: bool
    t0: float = field(default_factory=time.perf_counter)
    ckpts: dict[str, PhaseCheckpoint] = field(default_factory=dict)

    @property
    def source_name(self) -> str:
        return str(self.spec) if isinstance(self.spec, (str, Path)) else "<in-memory model>"


def _prepare(spec, out: Path, rc, corpus, device, progress, data, options, recipe) -> _Job:
    """Resolve the method, the model, the data and the process group; refuse what cannot run, before
    anything is trained or written."""
    from ..loader import family_named

    check_out_dir(out)
    group = init_distributed()  # under torchrun: DDP over the global batch (gloo on CPU, nccl on GPU)
    dev = resolve_device(device, group)
    model = load_source(spec, dev)
    family = family_named(model.cfg.family)  # None: the workbench's own models
    defaults = family.removal_defaults if family is not None else {}
    chosen = None
    if rc is None:
        rc, _, chosen = resolve(model.cfg, options or {}, recipe, defaults)
    rc.runtime.check_world(group.world)
    if group.main:
        warn_if_emulated(rc.runtime.dtype, dev)
    rc = rc.replace(dtype=resolve_dtype(rc.runtime.dtype, dev))  # the summary records what ran
    check_removable(model.cfg)
    if model.tokenizer is None:
        raise WorkbenchError("the model has no tokenizer; remove-ln needs one to read the fine-tuning corpus")
    source = _source_record(spec)
    corpus = corpus or source.get("corpus") or "english"
    if data is None:
        data = load_token_data(corpus, model.cfg.d_vocab, tokenizer=model.tokenizer)
    n_ctx = min(model.cfg.n_ctx, defaults.get("n_ctx", model.cfg.n_ctx))
    data.check_context(n_ctx)
    lr = rc.optimization.lr or defaults.get("lr") or 0.4 * (source.get("lr") or 6e-4)
    return _Job(spec, out, model, family, rc, chosen.name if chosen else None, source, corpus, data, n_ctx, lr, dev,
                group, progress)


def _arm(job: _Job, adapter, remove: bool, val: list[torch.Tensor] | None = None,
         teacher: torch.nn.Module | None = None) -> dict[str, Any]:
    phase = "removal" if remove else "control"
    rc = job.rc.for_arm(remove)
    cal = rc.calibration
    if rc.losses.teacher_of(remove) == "original":
        teacher = job.model.eval().requires_grad_(False)
    # both arms: the losses leave a sink's position 0 alone in the control too (it has no frozen norm to skip)
    arm = Arm(remove, SpecialPositions(adapter.eot_id, cal.special_positions, sink=cal.sink_prefix),
              label="remove-ln" if remove else "control", val=val, ckpt=job.ckpts.get(phase),
              on_step=_ON_STEP.get(phase), progress=job.progress, teacher=teacher)
    run = finetune(adapter, job.data, rc, job.lr, job.device, arm)
    run["positions"] = arm.positions
    return run


def _folded(job: _Job, adapter, twin, val, positions: SpecialPositions) -> tuple[GPT | None, float | None, float | None]:
    """The LN-free model folded from the trained adapter (on rank 0 under FSDP), its CE and the largest
    logit difference the fold made. With a sink prefix, position 0 as the adapter computes it (live norms)
    becomes the folded model's fixed prefix."""
    plain, plain_dev = adapter, job.device
    if job.rc.runtime.fsdp:
        gather_into(adapter, twin)
        plain, plain_dev = twin, torch.device("cpu")
    if job.rc.runtime.fsdp and not job.group.main:  # under FSDP only rank 0 holds the whole model
        return None, None, None
    ln_free = plain.fold()
    if positions.sink:
        sink.attach(ln_free, sink.capture(plain.net, job.data.bos, before=positions.update))
    ce = evaluate(ln_free, val, None, plain_dev)
    with torch.no_grad():
        x = val[0].to(plain_dev)
        positions.update(x)
        diff = (ln_free(x) - plain.net(x)).abs().max().item()
    return ln_free, ce, diff


def _remove(job: _Job) -> dict[str, Any]:
    rc, model, dev, fsdp = job.rc, job.model, job.device, job.rc.runtime.fsdp
    adapter = GPTRemoval(model, job.n_ctx, split_mlp=rc.schedule.split_mlp)
    control = control_copy(adapter) if rc.runtime.control else None
    if control is not None:
        control.net.cpu()  # the control waits on the CPU: the device holds one model while the removal runs
    # FSDP shards the modules in place; unsharded twins (on the CPU) receive the trained weights.
    twin = _cpu_copy(adapter) if fsdp else None
    control_twin = _cpu_copy(control) if fsdp and control is not None else None
    val = job.data.val_batches(rc.runtime.eval_batches, rc.runtime.eval_batch_size, job.n_ctx)
    ce_original = evaluate(model, val, None, dev)
    teacher, crun = None, None
    if rc.losses.teacher_of(True) == "control":  # the control trains first and stays on the device as teacher
        crun = _control_arm(job, control)
        teacher = control.net.eval().requires_grad_(False)
    run = _arm(job, adapter, remove=True, val=val, teacher=teacher)
    positions = run.pop("positions")
    ce_unfolded = evaluate(adapter.net, val, positions, dev)
    ln_free, ce_ln_free, fold_diff = _folded(job, adapter, twin, val, positions)
    summary = _summary(job, adapter, run, val, ce_original, ce_unfolded, ce_ln_free, fold_diff)
    if ln_free is not None:  # how far the norm-free model is from the one it was made from, and where it breaks
        summary["kl_ln_free_to_original"] = evaluate_kl(ln_free.to(dev), model, val, dev)
        summary["robustness"] = robustness(ln_free, job.data, job.n_ctx, dev)
    metrics = run["metrics"]
    if control is not None:
        if ln_free is not None:
            ln_free.cpu()  # written from the CPU anyway; the device now holds only the control
        if not fsdp:
            adapter.net.cpu()
        crun = crun or _control_arm(job, control)
        metrics = _compare(job, control, run, crun, summary, val, ln_free)
        if fsdp:
            gather_into(control, control_twin)
            control = control_twin
        if ln_free is not None:  # rank 0 holds both whole models now (on the CPU under FSDP)
            where = next(control.net.parameters()).device
            summary["kl_ln_free_to_control"] = evaluate_kl(ln_free.to(where), control.net, val, where)
            ln_free.cpu()
    kept = model.cfg.scheme.post_blocks(model.cfg.norm_context)
    if kept:
        summary["note"] = (f"{model.cfg.norm}: the Pre-norm blocks and the final norm were removed; the Post-norm "
                           f"blocks {kept} keep their live norm (it normalizes the residual stream itself)")
    summary.update(seconds=round(time.perf_counter() - job.t0, 2), world_size=job.group.world, device=str(dev),
                   dtype=rc.runtime.dtype)
    if job.group.main:
        family = job.family
        export = family.export if family is not None and family.removal_output == "export" else None
        _write_result(job.out, ln_free, control, summary, metrics, rc, export, val)
    if job.group.world > 1:
        torch.distributed.barrier()
    return summary


def _control_arm(job: _Job, control) -> dict[str, Any]:
    control.net.to(job.device)
    return _arm(job, control, remove=False)


def _compare(job: _Job, control, run, crun, summary, val, ln_free) -> list[dict[str, Any]]:
    """The control's side of the summary (CE, KL to the original, robustness, ΔCE, whether both arms saw the
    same batches, the norm-free model's KL to it); returns the removal's metrics with the control's loss."""
    dev, model = job.device, job.model
    summary["ce_control"] = evaluate(control.net, val, None, dev)
    summary["kl_control_to_original"] = evaluate_kl(control.net, model, val, dev)
    summary["robustness_control"] = robustness(control.net, job.data, job.n_ctx, dev)
    if summary["ce_ln_free"] is not None:
        summary["ce_ln_free_minus_control"] = summary["ce_ln_free"] - summary["ce_control"]
    summary["batches"] = same_batches(run, crun)
    by_step = {m["step"]: m["loss"] for m in crun["metrics"]}
    return [{**m, "control_loss": by_step.get(m["step"])} for m in run["metrics"]]


def _summary(job: _Job, adapter, run, val, ce_original, ce_unfolded, ce_ln_free, fold_diff) -> dict[str, Any]:
    source, model = job.source, job.model
    return {
        "source": job.source_name,
        "norm": model.cfg.norm,
        "family": model.cfg.family,
        "n_ctx": job.n_ctx,
        "ce_original": ce_original,
        "ce_control": None,
        "objective": job.rc.losses.objective,
        "kl_ln_free_to_original": None,
        "kl_control_to_original": None,
        "kl_ln_free_to_control": None,
        "teacher": job.rc.losses.teacher if job.rc.losses.distils else None,
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
        "lr": job.lr,
        "schedule": run["schedule"],
        "config": config_record(job.rc),
        "recipe": job.recipe,  # None: a RemovalConfig given whole
        "corpus": job.corpus,
        "eval_tokens": sum(b.shape[0] * (b.shape[1] - 1) for b in val),
    }


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
    if rc.optimization.lr is None:
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
    logits = sink.stock_forward(hf, directory)
    losses = [lm_cross_entropy(logits(b.cpu()), b.cpu()).item() for b in val]
    return sum(losses) / len(losses)


def _cpu_copy(adapter):
    twin = control_copy(adapter)
    twin.net.cpu()
    return twin


def _write_result(out: Path, ln_free: GPT, control, summary, metrics, rc, export=None, val=None) -> None:
    with io.atomic_dir(out) as tmp:
        if export is not None:  # a stock directory of the model's family (e.g. a Llama for SmolLM2)
            # checked on validation text: a norm-free model may overflow on random tokens (docs/ln_removal.md S2)
            summary["export"] = export(ln_free.cpu(), tmp, val[0][:2] if val else None)
            if val is not None:  # what stock transformers computes from the files just written
                summary["ce_stock_reload"] = _stock_ce(tmp, val)
        else:
            io.save_run(tmp, ln_free.cpu(), {"train": None, "removal": config_record(rc)})
        if control is not None:
            net = control.net.cpu()
            net.cfg = replace(net.cfg, split_ln1_v=True)
            io.save_run(tmp / "control", net, {"train": None, "control_of_removal": config_record(rc)})
        io.atomic_write_text(tmp / io.METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))
        io.atomic_write_json(tmp / io.SUMMARY_FILE, summary)


def validation_windows(model: GPT, corpus: str = "english", n: int = 32, seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """Up to ``n`` windows of validation text in the model's own tokenizer (random tokens without one)."""
    from ..batches import tokenize_works
    from ..corpus_spec import load_corpus

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
            io.save_run(tmp, converted, record)
        else:
            io.atomic_write_json(tmp / io.CONFIG_FILE, {"model": converted.cfg.to_dict(), **record, "workbench_version": __version__})
            io.save_weights(converted, tmp / io.MODEL_FILE)
        io.atomic_write_json(tmp / io.SUMMARY_FILE, summary)
    return summary


def truncate_to_dir(spec: str | Path | GPT, n_layers: int, out: str | Path, corpus: str = "english") -> dict[str, Any]:
    """``workbench truncate``: the first ``n_layers`` blocks as a run directory, the cut checked against the
    original's cache on validation text and refused unless exact (to float rounding)."""
    from ..model.truncate import check_truncatable, truncate, truncation_error

    out = Path(out)
    check_out_dir(out)
    model = load_source(spec, torch.device("cpu"))
    check_truncatable(model, n_layers)
    if model.tokenizer is None:
        raise WorkbenchError("the model has no tokenizer; a truncated test bed needs one to be fine-tuned on text")
    short = truncate(model, n_layers)
    batches, what = validation_windows(model, corpus, n=8)
    err = max(truncation_error(model, short, b) for b in batches)
    if not err <= 1e-4:
        raise WorkbenchError(f"the truncated model's logits differ from the original's cut by {err:.3g}; not writing it")
    summary = {"source": str(spec) if isinstance(spec, (str, Path)) else "<in-memory model>", "family": model.cfg.family,
               "layers_kept": n_layers, "layers_of_source": model.cfg.n_layers, "max_abs_logit_diff_vs_cache": err,
               "eval": what, "eval_tokens": sum(b.numel() for b in batches)}
    with io.atomic_dir(out) as tmp:
        io.save_run(tmp, short, {"train": None, "truncated_from": summary["source"], "layers_kept": n_layers})
        io.atomic_write_json(tmp / io.SUMMARY_FILE, summary)
    return summary


def repair_to_dir(directory: str | Path, out: str | Path, cfg: VocabRepair | None = None) -> dict[str, Any]:
    """``workbench repair-vocab``: a remove-ln directory with its runaway tokens' embedding rows shrunk
    (``removal/repair.py``), written atomically beside the source's control; the summary's CE, robustness
    and stock reload are measured again on the same validation windows, the ones before kept."""
    import shutil

    from ..loader import export, load

    d, out, cfg = Path(directory), Path(out), cfg or VocabRepair()
    check_out_dir(out)
    if not (d / io.SUMMARY_FILE).is_file():
        raise WorkbenchError(f"{d} is not a remove-ln directory (no {io.SUMMARY_FILE}); give the --out of remove-ln")
    before = io.read_json(d / io.SUMMARY_FILE, "run summary")
    model = load(d, device=torch.device("cpu"))
    data = load_token_data(before.get("corpus") or "english", model.cfg.d_vocab, tokenizer=model.tokenizer)
    n_ctx, conf = before["n_ctx"], before.get("config", {})
    val = data.val_batches(conf.get("eval_batches", 16), conf.get("eval_batch_size", 8), n_ctx)
    text = [data.train_batch(i, 8, n_ctx, conf.get("seed", 1)) for i in range(2)]
    ce_before = evaluate(model, val, None, torch.device("cpu"))
    # searched for runaways in running text: the training batches after the two that set the text's scale
    corpus = torch.cat([data.train_batch(i, 8, n_ctx, conf.get("seed", 1))
                        for i in range(2, 3 + cfg.corpus_windows // 8)])[: cfg.corpus_windows] \
        if cfg.corpus_windows else None
    report = repair_vocab(model, text, cfg, torch.from_numpy(data.train_counts(model.cfg.d_vocab)), corpus)
    summary = {**before, "repaired_from": str(d), "ce_ln_free": evaluate(model, val, None, torch.device("cpu")),
               "robustness": robustness(model, data, n_ctx, torch.device("cpu")),
               "vocab_repair": {**asdict(cfg), "ce_before": ce_before, **report}}
    if summary.get("ce_control") is not None:
        summary["ce_ln_free_minus_control"] = summary["ce_ln_free"] - summary["ce_control"]
    source = before.get("source")
    summary["kl_ln_free_to_original"] = evaluate_kl(model, load(source, device=torch.device("cpu")), val,
                                                    torch.device("cpu")) if source and source[0] != "<" else None
    summary["kl_ln_free_to_control"] = evaluate_kl(model, load(d / "control", device=torch.device("cpu")), val,
                                                   torch.device("cpu")) if (d / "control").is_dir() else None
    with io.atomic_dir(out) as tmp:
        summary["export"] = export(model, tmp, val[0][:2])
        summary["ce_stock_reload"] = _stock_ce(tmp, val)
        for extra in ("control", io.METRICS_FILE):
            if (d / extra).is_dir():
                shutil.copytree(d / extra, tmp / extra)
            elif (d / extra).is_file():
                shutil.copy2(d / extra, tmp / extra)
        io.atomic_write_json(tmp / io.SUMMARY_FILE, summary)
    return summary
