"""Folding a norm whose statistics are fixed into the linear layers that read it.

A norm with a frozen scale is affine:  y = (C x) ⊙ a + c,  with C the centering projection when the
norm centers (I − 11ᵀ/d), a = γ·depth_scale/σ and c = β·depth_scale. A reader z = y W + b then
equals  x (C diag(a) W) + (c W + b):  the norm disappears into the reader's weights and bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import WorkbenchError
from ..norms import Affine, IdentityStandardize, Norm
from ..norms.frozen import FrozenStandardize


@dataclass
class AffineMap:
    """y = (C x) ⊙ scale + shift, C = centering when ``centers``."""

    centers: bool
    scale: Float[Tensor, "d_model"]
    shift: Float[Tensor, "d_model"]


def norm_as_affine(norm: Norm, d_model: int) -> AffineMap:
    """The affine map of a norm whose scale is one frozen scalar (or that has no scale at all)."""
    st = norm.standardize
    if isinstance(st, FrozenStandardize):
        if st.special:
            raise WorkbenchError("a norm still keeps its own BOS/EOT scale; switch the special positions off first")
        if st.blend < 1.0:
            raise WorkbenchError("a norm is still being handed over from its live scale (--ramp); give the cool-down "
                                 "at least as many steps as the ramp")
        inv_sigma, centers = 1.0 / st.sigma.detach().double(), st.centers
    elif isinstance(st, IdentityStandardize):
        inv_sigma, centers = torch.tensor(1.0, dtype=torch.float64), False
    else:
        raise WorkbenchError(f"{type(st).__name__} has a live statistic; it is not an affine map to fold")
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


def identity_norm() -> Norm:
    return Norm(IdentityStandardize(), None)


@torch.no_grad()
def set_(param: nn.Parameter, value: Tensor) -> None:
    param.copy_(value.to(param.dtype))
