"""Exact, training-free transforms of a Pre-LN model.

* ``folded``: each LayerNorm's gain and bias folded into the weights that read it, those weights
  centered along d_model, and every residual writer (embeddings, W_O, b_O, W_out, b_out) centered —
  TransformerLens' ``fold_ln`` + ``center_writing_weights``. The norms keep only their
  standardization (``pre-ln`` with ``affine: false``).
* ``pre-rms``: with centered writers the residual stream has zero mean, so LayerNorm *is* RMSNorm
  (Jiang et al. 2023): the same model with RMSNorm, gain 1, no centering to compute.
* ``pre-crms``: a zero-mean vector is determined by d − 1 coordinates; dropping the last one gives a
  residual stream of width d − 1 and CRMSNorm, which restores Σx² + (Σx)² = ‖z‖² (Jiang et al. 2023).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from ..errors import WorkbenchError
from ..model import GPT
from ..norms import Norm
from ..model.fold import AffineMap, fold_heads, fold_reader, set_, with_biases_for

TARGETS = ("folded", "pre-rms", "pre-crms")


def _convertible(model: GPT) -> bool:
    """Every norm a live LayerNorm (centering, per-token std) before its sub-layer, none configured away."""
    cfg = model.cfg
    norms = [m for m in model.modules() if isinstance(m, Norm)]
    return (bool(norms) and cfg.scheme.residual_is_sum(cfg.norm_context) and not cfg.norm_kwargs
            and not cfg.split_ln1_v and not cfg.split_ln2_up
            and all(n.standardize.centers and n.standardize.live_rms_eps is not None for n in norms))


def _affine_only(norm, d: int) -> AffineMap:
    """The learned part of a norm (gain·depth scale, bias·depth scale) as an AffineMap on x̂, which
    already has zero mean — so its readers may be centered too."""
    a = norm.affine
    w = a.w.detach().double() if hasattr(a, "w") else torch.ones(d, dtype=torch.float64)
    b = a.b.detach().double() if getattr(a, "b", None) is not None else torch.zeros(d, dtype=torch.float64)
    return AffineMap(True, w * norm.depth_scale, b * norm.depth_scale)


def _center(W: Tensor) -> Tensor:
    return W - W.double().mean(-1, keepdim=True).to(W.dtype)


def _compress_reader(W: Tensor, dim: int) -> Tensor:
    """A reader of z ∈ R^d (mean zero) rewritten to read x = z[:-1]:  W[:-1] − W[-1]."""
    W = W.movedim(dim, 0)
    return (W[:-1] - W[-1:]).movedim(0, dim)


@torch.no_grad()
def convert(model: GPT, to: str) -> GPT:
    """The Pre-LN ``model`` transformed exactly into ``to`` (one of TARGETS)."""
    if to not in TARGETS:
        raise WorkbenchError(f"unknown conversion target {to!r}; choose one of: {', '.join(TARGETS)}")
    cfg = model.cfg
    if cfg.qk_norm is not None:
        raise WorkbenchError("convert cannot fold QK-norm gains (blocks.*.attn.q_norm / k_norm): each norm divides by the "
                             "RMS of the very projection a gain would be folded into; only a frozen QK-norm folds")
    if any(b.placement == "peri" for b in model.blocks):
        raise WorkbenchError("convert cannot fold live norms on sub-layer outputs (ln1_post / ln2_post): their gains fold "
                             "into W_O / W_out only once their scale is frozen — `workbench remove-ln` does that and folds them")
    if not _convertible(model):
        raise WorkbenchError(
            f"convert needs a Pre-LN model (pre-ln, lns or a GPT-2 checkpoint), not {cfg.norm!r}"
            + (f" with {cfg.norm_kwargs}" if cfg.norm_kwargs else "")
        )
    d = cfg.d_model
    new_cfg = {
        "folded": dataclasses.replace(cfg, norm="pre-ln", norm_kwargs={"affine": False}),
        "pre-rms": dataclasses.replace(cfg, norm="pre-rms", norm_kwargs={}),
        "pre-crms": dataclasses.replace(cfg, norm="pre-crms", norm_kwargs={}, d_model=d - 1, d_head=cfg.d_head),
    }[to]
    new_cfg = with_biases_for(model, new_cfg)
    out = GPT(new_cfg, model.tokenizer).to(model.W_U.device)
    # Writers centered (float64 for the mean), readers folded; crms then drops the last coordinate.
    write: Callable[[Tensor], Tensor] = (lambda W: W[..., :-1]) if to == "pre-crms" else (lambda W: W)
    read: Callable[[Tensor, int], Tensor] = _compress_reader if to == "pre-crms" else (lambda W, dim: W)
    set_(out.embed.W_E, write(_center(model.W_E)))
    if cfg.pos == "learned":
        set_(out.pos_embed.W_pos, write(_center(model.W_pos)))
    for bs, bo in zip(model.blocks, out.blocks):
        a, ao = bs.attn, bo.attn
        set_(ao.W_O, write(_center(a.W_O)))
        set_(ao.b_O, write(_center(a.b_O)))
        set_(bo.mlp.W_out, write(_center(bs.mlp.W_out)))
        set_(bo.mlp.b_out, write(_center(bs.mlp.b_out)))
        ln1, ln2 = _affine_only(bs.ln1, d), _affine_only(bs.ln2, d)
        for W, b in (("W_Q", "b_Q"), ("W_K", "b_K"), ("W_V", "b_V")):
            Wf, bf = fold_heads(ln1, getattr(a, W), getattr(a, b))
            set_(getattr(ao, W), read(Wf, 1))
            set_(getattr(ao, b), bf)
        for W, b, _ in bs.mlp.readers():
            Wf, bf = fold_reader(ln2, getattr(bs.mlp, W), getattr(bs.mlp, b))
            set_(getattr(bo.mlp, W), read(Wf, 0))
            set_(getattr(bo.mlp, b), bf)
    Wf, bf = fold_reader(_affine_only(model.ln_final, d), model.W_U, model.b_U)
    set_(out.unembed.W_U, read(Wf, 0))
    set_(out.unembed.b_U, bf)
    for norm in [m for b in out.blocks for m in (b.ln1, b.ln2)] + [out.ln_final]:
        if hasattr(norm.affine, "w"):  # the gain now lives in the readers
            norm.affine.w.fill_(1.0)
            if norm.affine.b is not None:
                norm.affine.b.zero_()
    return out.eval()


@torch.no_grad()
def max_abs_logit_diff(a: GPT, b: GPT, batches: list[Tensor]) -> float:
    return max((a(x) - b(x)).abs().max().item() for x in batches)
