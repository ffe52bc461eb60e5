"""Folding a norm whose statistics are fixed into the linear layers that read it (or, for a norm on a
sub-layer's output, into the one that writes it).

A norm with a frozen scale is affine:  y = (C x) ⊙ a + c,  with C the centering projection when the
norm centers (I − 11ᵀ/d), a = γ·depth_scale/σ and c = β·depth_scale. A reader z = y W + b then
equals  x (C diag(a) W) + (c W + b):  the norm disappears into the reader's weights and bias.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from typing import TYPE_CHECKING

from ..errors import WorkbenchError
from ..norms import Affine, IdentityStandardize, Norm

if TYPE_CHECKING:
    from .gpt import GPT


@dataclass
class AffineMap:
    """y = (C x) ⊙ scale + shift, C = centering when ``centers``."""

    centers: bool
    scale: Float[Tensor, "d_model"]
    shift: Float[Tensor, "d_model"]


def norm_as_affine(norm: Norm, d_model: int, site: str = "a norm") -> AffineMap:
    """The affine map of a norm whose scale is one frozen scalar (or that has no scale at all);
    ``site`` names the norm in the refusal."""
    st = norm.standardize
    inv_sigma, centers = 1.0 / st.fold_scale(site), st.centers  # the norm refuses while its scale is live
    aff = norm.affine
    w = aff.w.detach().double() if isinstance(aff, Affine) else torch.ones(d_model, dtype=torch.float64)
    b = aff.b.detach().double() if isinstance(aff, Affine) and aff.b is not None else torch.zeros(d_model, dtype=torch.float64)
    ds = float(norm.depth_scale)
    return AffineMap(centers, w * inv_sigma * ds, b * ds)


def fold_reader(m: AffineMap, W: Float[Tensor, "d_model n"], b: Float[Tensor, "n"] | None) -> tuple[Tensor, Tensor]:
    """(W', b') with  x W' + b' = m(x) W + b  for every x; computed in float64."""
    W64 = W.detach().double()
    Wf = m.scale[:, None] * W64
    if m.centers:
        Wf = Wf - Wf.mean(0, keepdim=True)
    bf = m.shift @ W64 + (b.detach().double() if b is not None else 0.0)
    return Wf.to(W.dtype), bf.to(W.dtype)


def fold_heads(m: AffineMap, W: Float[Tensor, "head d_model d_head"], b: Float[Tensor, "head d_head"]) -> tuple[Tensor, Tensor]:
    h, d, dh = W.shape
    W2, b2 = fold_reader(m, W.permute(1, 0, 2).reshape(d, h * dh), b.reshape(-1))
    return W2.reshape(d, h, dh).permute(1, 0, 2).contiguous(), b2.reshape(h, dh)


def fold_writer(m: AffineMap, W: Float[Tensor, "n d_model"], b: Float[Tensor, "d_model"] | None) -> tuple[Tensor, Tensor]:
    """(W', b') with  x W' + b' = m(x W + b)  for every x: a norm on a sub-layer's output folded into the
    matrix that writes it (sandwich blocks' ``ln1_post`` into W_O, ``ln2_post`` into W_out); float64."""
    W64 = W.detach().double()
    b64 = b.detach().double() if b is not None else torch.zeros(W.shape[-1], dtype=torch.float64)
    if m.centers:
        W64, b64 = W64 - W64.mean(-1, keepdim=True), b64 - b64.mean()
    return (W64 * m.scale).to(W.dtype), (b64 * m.scale + m.shift).to(W.dtype)


def identity_norm() -> Norm:
    return Norm(IdentityStandardize(), None)


@torch.no_grad()
def set_(param: nn.Parameter, value: Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def fold_norms(src: "GPT") -> "GPT":
    """The norm-free GPT computing what ``src`` computes once every Pre-norm of ``src`` is affine (a
    frozen scale, or no scale): each norm folded into the weights that read it, no norm left. Post-norm
    blocks (Mix-LN) keep their live norms; the result then says ``pre_ln_free`` in its norm kwargs."""
    from .gpt import GPT

    cfg = src.cfg
    if all(b.placement in ("pre", "peri") for b in src.blocks):
        new_cfg = dataclasses.replace(cfg, norm="none", norm_kwargs={}, split_ln1_v=False, split_ln2_up=False,
                                      qk_norm=None)
    else:
        new_cfg = dataclasses.replace(cfg, norm_kwargs={**cfg.norm_kwargs, "pre_ln_free": True}, split_ln1_v=False,
                                      split_ln2_up=False, qk_norm=None)
    new_cfg = with_biases_for(src, new_cfg)
    out = GPT(new_cfg, src.tokenizer).to(src.W_U.device)
    own = {k: v for k, v in src.state_dict().items()
           if ".ln" not in k and not k.startswith("ln_final") and "_norm." not in k}  # norms folded below
    post_norms = {k: v for k, v in src.state_dict().items()
                  if any(k.startswith(f"blocks.{b.layer}.ln") for b in src.blocks if b.placement == "post")}
    missing, unexpected = out.load_state_dict({**own, **post_norms}, strict=False)
    absent = {n for n, _ in src.named_buffers()}  # biases the family lacks, now real parameters (set below)
    if unexpected or any(".ln" not in k and not k.startswith("ln_final") and k not in absent for k in missing):
        raise RuntimeError(f"fold lost weights: missing {missing}, unexpected {unexpected}")
    d = cfg.d_model
    for b_src, b_out in zip(src.blocks, out.blocks):
        if b_src.placement == "post":
            continue
        if b_src.placement == "peri":
            _fold_writers(b_src, b_out, d)
        v_norm = b_src.ln1_v if b_src.ln1_v is not None else b_src.ln1
        up_norm = b_src.ln2_up if b_src.ln2_up is not None else b_src.ln2
        l = b_src.layer
        qk, v, mlp, up = (norm_as_affine(n, d, f"blocks.{l}.{name}") for n, name in
                          ((b_src.ln1, "ln1"), (v_norm, "ln1_v" if b_src.ln1_v is not None else "ln1"), (b_src.ln2, "ln2"),
                           (up_norm, "ln2_up" if b_src.ln2_up is not None else "ln2")))
        a_src, a_out = b_src.attn, b_out.attn
        after = {"W_Q": a_src.q_norm, "W_K": a_src.k_norm}  # QK-norms, applied to the projections' outputs
        for W, bias, m in (("W_Q", "b_Q", qk), ("W_K", "b_K", qk), ("W_V", "b_V", v)):
            Wf, bf = fold_heads(m, getattr(a_src, W), getattr(a_src, bias))
            if after.get(W) is not None:
                Wf, bf = _fold_qk_norm(after[W], Wf, bf, f"blocks.{l}.attn.{'q' if W == 'W_Q' else 'k'}_norm")
            set_(getattr(a_out, W), Wf)
            set_(getattr(a_out, bias), bf)
        for W, bias, path in b_src.mlp.readers():
            Wf, bf = fold_reader(up if path == "up" else mlp, getattr(b_src.mlp, W), getattr(b_src.mlp, bias))
            set_(getattr(b_out.mlp, W), Wf)
            set_(getattr(b_out.mlp, bias), bf)
    Wf, bf = fold_reader(norm_as_affine(src.ln_final, d, "ln_final"), src.W_U, src.b_U)
    set_(out.unembed.W_U, Wf)
    set_(out.unembed.b_U, bf)
    return out.eval()


def _fold_qk_norm(norm: Norm, W: Float[Tensor, "head d_model d_head"], b: Float[Tensor, "head d_head"],
                  site: str) -> tuple[Tensor, Tensor]:
    """A frozen QK-norm — per head (σ per head, gain over d_head) or over the whole projection (one σ, gain
    over head·d_head) — folded into the projection whose output it divides: q = (x W + b) ⊙ g / σ_head."""
    n, _, dh = W.shape
    m = norm_as_affine(norm, norm.affine.w.shape[-1], site)  # refuses while the QK-norm is live
    if m.centers:
        raise WorkbenchError(f"{site} centers its input; only RMS-type QK-norms fold")
    scale, shift = m.scale.reshape(-1, dh).expand(n, dh), m.shift.reshape(-1, dh).expand(n, dh)
    return (W.double() * scale[:, None, :]).to(W.dtype), (b.double() * scale + shift).to(b.dtype)


def _fold_writers(b_src, b_out, d: int) -> None:
    """A sandwich block's frozen output norms into the matrices that write the sub-layers' outputs."""
    l = b_src.layer
    attn = norm_as_affine(b_src.ln1_post, d, f"blocks.{l}.ln1_post")
    h, dh, _ = b_src.attn.W_O.shape
    Wf, bf = fold_writer(attn, b_src.attn.W_O.reshape(h * dh, d), b_src.attn.b_O)
    set_(b_out.attn.W_O, Wf.reshape(h, dh, d))
    set_(b_out.attn.b_O, bf)
    Wf, bf = fold_writer(norm_as_affine(b_src.ln2_post, d, f"blocks.{l}.ln2_post"), b_src.mlp.W_out, b_src.mlp.b_out)
    set_(b_out.mlp.W_out, Wf)
    set_(b_out.mlp.b_out, bf)


def with_biases_for(src: nn.Module, cfg):
    """A norm with a bias (LayerNorm's β) folds into biases of its readers: a family without those biases
    (GPT-NeoX's unembedding, say) gets them as real parameters, or they would be zero buffers — never saved."""
    has_shift = any(isinstance(m, Norm) and getattr(m.affine, "b", None) is not None for m in src.modules())
    if not has_shift:
        return cfg
    # a sandwich block's output norm folds its β into the bias of the matrix that writes that output
    peri = any(getattr(b, "placement", None) == "peri" for b in getattr(src, "blocks", ()))
    return dataclasses.replace(cfg, qkv_bias=True, mlp_bias=True, unembed_bias=True, o_bias=cfg.o_bias or peri)


def as_norm_free(model: "GPT", eps: float) -> "GPT":
    """A model whose every norm is an identity made of a huge ε (our exports of norm-free models to
    stock formats, see ``workbench.loader``): each is the affine map it computes, x·γ/√ε; fold them."""
    from ..norms.frozen import FrozenStandardize

    sigma = math.sqrt(torch.tensor(eps, dtype=torch.float32).item())
    for m in model.modules():
        if isinstance(m, Norm) and not m.standardize.is_identity:  # OLMo 2's absent input norms stay absent
            m.standardize = FrozenStandardize(sigma, centers=m.standardize.centers)
    return fold_norms(model)


def is_norm_free(model: nn.Module) -> bool:
    """True when no module of ``model`` computes a statistic or holds a norm parameter."""
    for m in model.modules():
        if isinstance(m, Norm) and (not m.standardize.is_identity or any(True for _ in m.parameters())):
            return False
    return True
