"""Normalization schemes. Importing this package registers every scheme, in this order."""

from . import layernorm, post_ln, mix_ln, lns, rmsnorm, crmsnorm, powernorm, unified, batchnorm, dyt, srms, qk_norm, peri_ln, none  # noqa: F401
from .base import Affine, IdentityStandardize, Norm, Standardize
from .registry import NormScheme, all_schemes, get_scheme, register, scheme_names

__all__ = ["Affine", "IdentityStandardize", "Norm", "NormScheme", "Standardize", "all_schemes",
           "get_scheme", "register", "scheme_names"]
