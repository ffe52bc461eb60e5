"""Scripted layer-ablation studies: a TOML file names models, blocks (or spans of blocks), ablation
kinds and metrics; ``study_table`` gives one tidy table and ``study_figure`` a figure per ablation kind
(``workbench.studies.run_study`` loads the models and writes both).

    [study]
    name = "ablations"
    corpus = "english"          # validation split
    tokens = 8192
    metrics = ["delta_ce", "kl", "top1_agreement"]

    [[models]]
    spec = "zoo/small/pre-ln"   # any model spec: run directory, smollm2, HF directory, hf:NAME

    [[ablations]]
    kind = "skip"               # skip: block output := block input
    blocks = "all"              # "all", or a list of indices and spans: [0, 3, "4-7"]
                                # (a span is ablated as one unit)
    [[ablations]]
    kind = "mean"               # mean: attention and MLP outputs := their mean over the data
    blocks = ["0-1", 5]         # zero: attention and MLP outputs := 0
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import WorkbenchError
from .depth import corpus_batches

KINDS = ("skip", "zero", "mean")
METRICS = ("delta_ce", "kl", "top1_agreement")


@dataclass(frozen=True)
class Ablation:
    kind: str
    blocks: list | str


@dataclass(frozen=True)
class Study:
    name: str
    models: list[str]
    ablations: list[Ablation]
    corpus: str = "english"
    tokens: int = 8192
    metrics: tuple[str, ...] = METRICS


def load_study(path: str | Path) -> Study:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkbenchError(f"study file {path} not found") from None
    except UnicodeDecodeError:
        raise WorkbenchError(f"study file {path} is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise WorkbenchError(f"study file {path} is not valid TOML: {e}") from None

    def bad(what: str) -> WorkbenchError:
        return WorkbenchError(f"study file {path}: {what}")

    head = raw.get("study", {})
    if not isinstance(head, dict):
        raise bad("study must be a [study] table")
    entries = raw.get("models", [])
    if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
        raise bad("models must be [[models]] tables with a spec = \"...\"")
    models = [m.get("spec") for m in entries]
    if not models or not all(isinstance(m, str) for m in models):
        raise WorkbenchError(f"study file {path} needs [[models]] entries with a spec = \"...\"")
    entries = raw.get("ablations", [])
    if not isinstance(entries, list) or not all(isinstance(a, dict) for a in entries):
        raise bad("ablations must be [[ablations]] tables with a kind = \"...\"")
    ablations = []
    for a in entries:
        if a.get("kind") not in KINDS:
            raise WorkbenchError(f"study file {path}: ablation kind {a.get('kind')!r} unknown; use one of {', '.join(KINDS)}")
        ablations.append(Ablation(a["kind"], a.get("blocks", "all")))
    if not ablations:
        raise WorkbenchError(f"study file {path} needs at least one [[ablations]] entry")
    metrics = head.get("metrics", list(METRICS))
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise bad(f"metrics = {metrics!r} must be a non-empty list such as [\"delta_ce\", \"kl\"]")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise WorkbenchError(f"study file {path}: unknown metrics {unknown}; use {', '.join(METRICS)}")
    tokens = head.get("tokens", 8192)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise bad(f"tokens must be positive (a whole number), got {tokens!r}")
    corpus = head.get("corpus", "english")
    if not isinstance(corpus, str):
        raise bad(f"corpus = {corpus!r} must be a string (english, a .txt file or folder, mix:…)")
    return Study(str(head.get("name", path.stem)), models, ablations, corpus, tokens, tuple(metrics))


def resolve_units(blocks: list | str, n_layers: int, model: str) -> list[tuple[str, list[int]]]:
    """(label, block indices) per ablation unit; spans like "4-7" are one unit."""
    if blocks == "all":
        return [(str(l), [l]) for l in range(n_layers)]
    if not isinstance(blocks, list):
        raise WorkbenchError(f"blocks must be \"all\" or a list of indices and spans, got {blocks!r}")
    units = []
    for b in blocks:
        if isinstance(b, int):
            idx = [b]
        elif isinstance(b, str) and "-" in b and all(p.strip().isdigit() for p in b.split("-", 1)):
            lo, hi = (int(p) for p in b.split("-", 1))
            idx = list(range(lo, hi + 1))
        else:
            raise WorkbenchError(f"block {b!r} is neither an index nor a span like \"4-7\"")
        bad = [i for i in idx if not 0 <= i < n_layers]
        if bad or not idx:
            raise WorkbenchError(f"block {b!r} does not exist in {model} (blocks 0..{n_layers - 1})")
        units.append((str(b), idx))
    return units


def _hooks(kind: str, blocks: list[int], means: dict[str, Tensor]):
    # Behind a sink prefix (model/sink.py) the hooks see positions ≥ 1 only: the stored position 0 is never ablated.
    hooks = []
    for l in blocks:
        if kind == "skip":
            saved: dict = {}
            hooks += [(f"blocks.{l}.hook_resid_pre", lambda x, hook, s=saved: s.__setitem__("x", x)),
                      (f"blocks.{l}.hook_resid_post", lambda x, hook, s=saved: s["x"])]
        else:
            for site in ("hook_attn_out", "hook_mlp_out"):
                name = f"blocks.{l}.{site}"
                hooks.append((name, (lambda x, hook: torch.zeros_like(x)) if kind == "zero"
                              else (lambda x, hook, m=means[name]: m.expand_as(x).clone())))
    return hooks


@torch.no_grad()
def _sublayer_means(model, batches) -> dict[str, Tensor]:
    """Each sublayer output's mean over the positions its hook sees: behind a sink prefix (``model/sink.py``)
    one fewer than the tokens, position 0 being the stored prefix, which no ablation reaches."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    names = {f"blocks.{l}.{s}" for l in range(model.cfg.n_layers) for s in ("hook_attn_out", "hook_mlp_out")}

    def add(x, hook):
        key = hook.name if hook.name in names else _canonical(hook.name)
        sums[key] = sums.get(key, 0) + x.sum((0, 1))
        counts[key] = counts.get(key, 0) + x.shape[0] * x.shape[1]

    with model.hooks(fwd_hooks=[(n, add) for n in names]):
        for t in batches:
            model(t, return_type=None)
    return {k: v / counts[k] for k, v in sums.items()}


def _canonical(name: str) -> str:
    # TransformerBridge reports some aliased hooks under their canonical names (hook_out for hook_attn_out).
    return name.replace("attn.hook_out", "hook_attn_out").replace("mlp.hook_out", "hook_mlp_out")


@torch.no_grad()
def _evaluate(model, batches, hooks, base_logp) -> dict[str, float]:
    ce = kl = agree = 0.0
    n = 0
    with model.hooks(fwd_hooks=hooks):
        for t, ref in zip(batches, base_logp):
            logp = model(t).log_softmax(-1)[:, :-1]
            target = t[:, 1:]
            ce += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
            kl += (ref.exp() * (ref - logp)).sum().item()
            agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
            n += target.numel()
    return {"ce": ce / n, "kl": kl / n, "top1_agreement": agree / n}


def study_table(study: Study, models: dict, progress: bool = True) -> pd.DataFrame:
    """Every (model, ablation, unit) of ``study`` over the loaded ``models`` (keyed by spec): tidy rows
    (model, kind, blocks, first_block, metric, value). ``workbench.studies.run_study`` loads the models
    and writes the table and figures."""
    plan = {spec: [(a.kind, resolve_units(a.blocks, m.cfg.n_layers, spec)) for a in study.ablations]
            for spec, m in models.items()}  # validate every block before computing anything
    rows = []
    total = sum(len(u) for p in plan.values() for _, u in p)
    bar = tqdm(total=total, desc=f"study {study.name}", disable=not progress, leave=False)
    for spec, model in models.items():
        model.eval()
        batches = corpus_batches(model, study.corpus, study.tokens)
        with torch.no_grad():
            base_logp = [model(t).log_softmax(-1)[:, :-1] for t in batches]
        base = _evaluate(model, batches, [], base_logp)
        means = _sublayer_means(model, batches) if any(k == "mean" for k, _ in plan[spec]) else {}
        for kind, units in plan[spec]:
            for label, blocks in units:
                bar.set_postfix(model=Path(spec).name, kind=kind, blocks=label)
                r = _evaluate(model, batches, _hooks(kind, blocks, means), base_logp)
                values = {"delta_ce": r["ce"] - base["ce"], "kl": r["kl"], "top1_agreement": r["top1_agreement"]}
                rows += [{"model": spec, "kind": kind, "blocks": label, "first_block": blocks[0], "metric": k,
                          "value": values[k]} for k in study.metrics]
                bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def study_figure(table: pd.DataFrame, kind: str, metric: str = "delta_ce") -> go.Figure:
    t = table[(table.kind == kind) & (table.metric == metric)]
    fig = go.Figure()
    for model, g in t.groupby("model", sort=False):
        fig.add_scatter(x=g.blocks, y=g.value, mode="lines+markers", name=str(model))
    fig.update_layout(title=f"{metric} when blocks are ablated ({kind})", xaxis_title="block(s)",
                      yaxis_title=metric, template="plotly_white")
    return fig
