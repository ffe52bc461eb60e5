"""Depth diagnostics: residual variance by depth, norm scales, block updates, angular distance,
gradient norms per block and the loss increase when a block is skipped.

Layers index the residual stream: h_0 … h_{L−1} are the inputs of blocks 0 … L−1
(``blocks.{l}.hook_resid_pre``) and h_L is the output of the last block. Statistics are streamed
(Welford accumulators, a log-spaced histogram for the median): memory does not grow with the number
of tokens. Pretrained models often park "massive activations" on the first token (an attention
sink), which swamp a plain mean; every residual statistic is therefore also reported over positions
≥ 1 and as a median over tokens.

Behind an attention-sink prefix (``model/sink.py``) position 0 is not computed: its residual is not there to
measure, so what needs it (``resid_var``, ``resid_rms``, ``max_abs_first``) is None and every other statistic
is over positions ≥ 1. The prefix is a constant of the weights: a skipped block is skipped at positions ≥ 1,
position 0's keys, values and logits staying the stored ones, and no gradient flows through them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..model import GPT
from .positions import first_computed
from .streaming import LogHistogram, Welford

SCHEMA_VERSION = 1
MASSIVE_FACTOR = 20.0
MAX_MASSIVE = 8  # report at most this many massive dimensions per layer, largest first  # a dimension is "massive" when its max |activation| exceeds 20× the median token RMS


@dataclass
class _Layer:
    var_all: Welford = field(default_factory=Welford)  # element variance, all positions
    var_rest: Welford = field(default_factory=Welford)  # element variance, positions ≥ 1
    token_var: LogHistogram = field(default_factory=LogHistogram)  # per-token variance (over d_model)
    token_rms: LogHistogram = field(default_factory=LogHistogram)
    max_abs_first: Tensor | None = None  # per dimension, position 0
    max_abs_rest: Tensor | None = None  # per dimension, positions ≥ 1
    sq_norm: Tensor | None = None  # per-token ‖h‖² of the current batch

    def add(self, x: Float[Tensor, "batch pos d_model"], first: int) -> None:
        """One batch of residuals whose first position is token position ``first`` (1 behind a sink prefix)."""
        d = x.shape[-1]
        # One pass each for per-token sums and norms; everything else derives from them.
        s1 = x.sum(-1).double()
        s2 = torch.linalg.vector_norm(x, dim=-1).double().pow(2)
        rest = 1 - first  # where positions ≥ 1 start in x
        self.var_all.update_moments(s1.numel() * d, s1.sum().item(), s2.sum().item())
        self.var_rest.update_moments(s1[:, rest:].numel() * d, s1[:, rest:].sum().item(), s2[:, rest:].sum().item())
        self.token_var.update((s2 / d - (s1 / d) ** 2).clamp_min(0))
        self.token_rms.update((s2 / d).sqrt())
        if not first:
            m0 = x[:, 0].abs().amax(0)
            self.max_abs_first = m0 if self.max_abs_first is None else torch.maximum(self.max_abs_first, m0)
        lo, hi = torch.aminmax(x[:, rest:], dim=1)  # reduce positions first: no copy of the slice
        m1 = torch.maximum(hi.amax(0), -lo.amin(0))
        self.max_abs_rest = m1 if self.max_abs_rest is None else torch.maximum(self.max_abs_rest, m1)
        self.sq_norm = s2

    def record(self, layer: int, first: int, scales: dict) -> dict:
        """The layer's row of ``residual_statistics`` (``scales``: the norm-scale columns); behind a sink prefix
        (``first`` 1) what needs position 0 is None."""
        med_rms = self.token_rms.quantile(0.5)
        m0, m1 = self.max_abs_first, self.max_abs_rest
        peak = m1 if first else torch.maximum(m0, m1)
        dims = [d for d in peak.argsort(descending=True)[:MAX_MASSIVE].tolist() if peak[d] > MASSIVE_FACTOR * med_rms]
        massive = [{"dim": d, "max_abs_first": None if first else m0[d].item(), "max_abs_rest": m1[d].item()}
                   for d in dims]
        return {
            "layer": layer,
            "resid_var": None if first else self.var_all.var, "resid_var_pos1": self.var_rest.var,
            "resid_rms": None if first else math.sqrt(self.var_all.var + self.var_all.mean ** 2),
            "resid_rms_pos1": math.sqrt(self.var_rest.var + self.var_rest.mean ** 2),
            "resid_var_median_token": self.token_var.quantile(0.5), "resid_rms_median_token": med_rms,
            **scales, "massive_dims": massive,
        }


def _resid_names(model: GPT) -> list[str]:
    L = model.cfg.n_layers
    return [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]


@torch.no_grad()
def residual_statistics(model: GPT, batches: list[Tensor], far: int = 4) -> dict:
    """Forward-only statistics over ``batches`` (each [batch, pos] tokens)."""
    model.eval()
    names = _resid_names(model)
    L = model.cfg.n_layers
    layers = [_Layer() for _ in names]
    scales = {site: [Welford() for _ in range(L)] for site in norm_sites(model)}
    final_scale = Welford()
    update = [Welford() for _ in range(L)]
    angular = {n: [Welford() for _ in range(L + 1 - n)] for n in sorted({1, far})}
    n_tokens = 0
    current: dict[int, Tensor] = {}
    first = first_computed(model)

    def resid_hook(x, hook, i):
        current[i] = x
        layers[i].add(x, first)

    hooks = [(name, lambda x, hook, i=i: resid_hook(x, hook, i)) for i, name in enumerate(names)]
    for site, acc in scales.items():
        hooks += [(f"blocks.{l}.{site}.hook_scale", lambda x, hook, a=acc[l]: a.update(x)) for l in range(L)]
    hooks.append(("ln_final.hook_scale", lambda x, hook: final_scale.update(x)))
    with model.hooks(fwd_hooks=hooks):  # registered once for the whole stream
        for tokens in batches:
            current.clear()
            model(tokens, return_type=None)
            n_tokens += tokens.numel()
            for l in range(L):
                a, b = current[l], current[l + 1]
                sa, sb = layers[l].sq_norm, layers[l + 1].sq_norm
                ab = torch.einsum("bpd,bpd->bp", a, b).double()  # ‖b − a‖² = ‖a‖² − 2a·b + ‖b‖²
                update[l].update((sa - 2 * ab + sb).clamp_min(0).sqrt() / sa.sqrt().clamp_min(1e-30))
            for n, accs in angular.items():
                for l, acc in enumerate(accs):
                    cos = torch.cosine_similarity(current[l][:, -1], current[l + n][:, -1], dim=-1)
                    acc.update(torch.arccos(cos.clamp(-1, 1)) / math.pi)
    current.clear()

    out: dict = {"n_tokens": n_tokens, "layers": []}
    for i, s in enumerate(layers):
        out["layers"].append(s.record(i, first, {
            **{f"{site.removeprefix('attn.')}_scale": acc[i].mean if i < L else None for site, acc in scales.items()},
            "ln_final_scale": final_scale.mean if i == L else None,
            "block_update_ratio": update[i].mean if i < L else None,
        }))
    out["angular_distance"] = {str(n): [a.mean for a in accs] for n, accs in angular.items()}
    return out


# Every norm site a block may have: its input norms, a sandwich block's output norms, QK-norms (whose
# per-head scales are averaged over heads as over tokens).
BLOCK_SITES = ("ln1", "ln2", "ln1_post", "ln2_post", "attn.q_norm", "attn.k_norm")


def norm_sites(model: GPT) -> list[str]:
    """The block-level norm sites ``model`` has (``ln1`` and ``ln2`` always: identities report scale 1)."""
    def has(site: str) -> bool:
        owner, _, name = site.rpartition(".")
        return getattr(model.blocks[0].get_submodule(owner), name, None) is not None

    return [s for s in BLOCK_SITES if has(s)]


_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.")
# Parameter groups by name, for our models (blocks.3.attn.W_Q, blocks.3.ln1.affine.w) and for
# Hugging Face ones (model.layers.3.self_attn.q_proj.weight, ...input_layernorm.weight).
_GROUPS = (("attn", ("attn",)), ("mlp", ("mlp",)), ("norm", (".ln", "norm")))


def parameter_group(name: str) -> tuple[int, str] | None:
    m = _LAYER.search(name)
    if m is None:
        return None
    group = next((g for g, keys in _GROUPS if any(k in name for k in keys)), "other")
    return int(m.group(1)), group


def gradient_norms(model: GPT, batches: list[Tensor]) -> list[dict]:
    """L2 norm of the LM-loss gradient per block and per parameter group, averaged over batches."""
    sums: dict[tuple[int, str], float] = {}
    was_training = model.training
    model.eval()  # no batch-statistics updates; the gradient is the same function of the weights
    for tokens in batches:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(tokens, return_type="loss").backward()
        sq: dict[tuple[int, str], float] = {}
        for name, p in model.named_parameters():
            where = parameter_group(name)
            if where is None or p.grad is None:
                continue
            layer, group = where
            g = p.grad.pow(2).sum().item()
            for key in ((layer, "block"), (layer, group)):
                sq[key] = sq.get(key, 0.0) + g
        for k, v in sq.items():
            sums[k] = sums.get(k, 0.0) + math.sqrt(v)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return [{"layer": l, **{g: sums.get((l, g), 0.0) / len(batches) for g in ("block", "attn", "mlp", "norm")}}
            for l in range(model.cfg.n_layers)]


@torch.no_grad()
def skip_block_delta_ce(model: GPT, batches: list[Tensor]) -> tuple[float, list[float]]:
    """Validation CE, and its increase when each block is skipped (its output := its input)."""
    model.eval()

    def ce(hooks=()) -> float:
        with model.hooks(fwd_hooks=list(hooks)):
            return sum(model(t, return_type="loss").item() * t.shape[0] for t in batches) / sum(t.shape[0] for t in batches)

    base = ce()
    deltas = []
    for l in range(model.cfg.n_layers):
        saved: dict[str, Tensor] = {}
        hooks = [(f"blocks.{l}.hook_resid_pre", lambda x, hook: saved.__setitem__("x", x)),
                 (f"blocks.{l}.hook_resid_post", lambda x, hook: saved["x"])]
        deltas.append(ce(hooks) - base)
    return base, deltas


def depth_table(result: dict) -> pd.DataFrame:
    """Tidy rows (metric, layer, value) of a diagnose result."""
    rows = []
    for rec in result["residual"]["layers"]:
        for k, v in rec.items():
            if k not in ("layer", "massive_dims") and v is not None:
                rows.append({"metric": k, "layer": rec["layer"], "value": v})
    for n, values in result["residual"]["angular_distance"].items():
        rows += [{"metric": f"angular_distance_n{n}", "layer": l, "value": v} for l, v in enumerate(values)]
    for rec in result.get("grad_norm", []):
        rows += [{"metric": f"grad_norm_{g}", "layer": rec["layer"], "value": rec[g]} for g in rec if g != "layer"]
    for l, v in enumerate(result.get("ablation_delta_ce", [])):
        rows.append({"metric": "ablation_delta_ce", "layer": l, "value": v})
    return pd.DataFrame(rows)


def corpus_batches(model: GPT, corpus: str, n_tokens: int, batch_size: int = 8) -> list[Tensor]:
    """Context-length windows spread over the corpus' validation works, in the model's tokenizer."""
    from ..batches import TokenData, tokenize_works
    from ..corpus_spec import load_corpus

    val = tokenize_works(model.tokenizer, load_corpus(corpus).val)
    data = TokenData(corpus, model.tokenizer, val, val)
    data.check_context(model.cfg.n_ctx)
    n_seq = max(1, math.ceil(n_tokens / model.cfg.n_ctx))
    n_batches = math.ceil(n_seq / batch_size)
    return data.val_batches(n_batches, batch_size, model.cfg.n_ctx)


def diagnose(model: GPT, corpus: str = "english", tokens: int = 32768, grad_batches: int = 4, far: int | None = None,
             batch_size: int = 8, model_id: str = "") -> dict:
    """Every depth diagnostic of ``model`` on ``tokens`` validation tokens of ``corpus``."""
    from ..errors import WorkbenchError

    far = min(4, model.cfg.n_layers) if far is None else far
    if tokens <= 0 or grad_batches <= 0 or batch_size <= 0:
        raise WorkbenchError("--tokens, --batches and the batch size must be positive")
    if not 1 <= far <= model.cfg.n_layers:
        raise WorkbenchError(f"angular distance offset n={far} must lie in 1..{model.cfg.n_layers} (the model's depth)")
    batches = corpus_batches(model, corpus, tokens, batch_size)
    residual = residual_statistics(model, batches, far)
    # The 2L+1 forward passes of the layer-skip ΔCE read a quarter of the *sequences* (not of the batches:
    # a long context makes few batches, and a quarter of one batch must not become all of it).
    seqs = torch.cat(batches)
    base_ce, delta = skip_block_delta_ce(model, list(seqs[: max(1, len(seqs) // 4)].split(batch_size)))
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"id": model_id, "norm": model.cfg.norm, "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model},
        "data": {"corpus": corpus, "split": "validation", "n_tokens": residual["n_tokens"], "n_ctx": model.cfg.n_ctx,
                 "grad_batches": min(grad_batches, len(batches)), "far": far},
        "residual": residual,
        "grad_norm": gradient_norms(model, batches[:grad_batches]),
        "val_ce": base_ce,
        "ablation_delta_ce": delta,
    }
