"""One registry of normalization schemes; each scheme module registers itself on import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import nn

from ..errors import WorkbenchError


@dataclass(frozen=True)
class NormContext:
    """What a norm may know about the model it sits in (``ModelConfig.norm_context``)."""

    d_model: int
    eps: float
    n_layers: int
    kwargs: dict[str, Any] = field(default_factory=dict)  # ModelConfig.norm_kwargs

Site = Literal["ln1", "ln2", "ln1_post", "ln2_post", "ln_final"]
# pre: norms on the sublayer inputs; post: on the residual stream after each addition; peri: on the
# sublayer inputs and outputs (sandwich; the inputs' may be identities, OLMo-2).
Placement = Literal["pre", "post", "peri"]


def _always_pre(ctx: "NormContext", layer: int) -> Placement:
    return "pre"


def _no_validation(ctx: "NormContext") -> None:
    return None


def _never(ctx: "NormContext") -> bool:
    return False


@dataclass(frozen=True)
class NormScheme:
    """Where the norms sit in the network and what each one is.

    ``make(ctx, layer, site)`` builds the norm module for ``blocks.{layer}.{site}`` (``layer`` is
    ``None`` for ``ln_final``). ``placement(ctx, layer)`` says whether block ``layer`` normalizes its
    sub-layer inputs (Pre-norm) or the residual stream after each addition (Post-norm).
    """

    name: str
    description: str
    reference: str
    make: Callable[["NormContext", int | None, Site], nn.Module]
    placement: Callable[["NormContext", int], Placement] = _always_pre
    # What TransformerLens' ActivationCache should assume when it applies the cached final-norm
    # scale. None = no norm; any other string TL does not know = "not a per-token scale".
    tl_normalization_type: str | None = "LN"
    # False when the norm is not a per-token scalar division TL can replay from ``hook_scale``.
    scale_is_per_token: bool = True
    validate: Callable[["NormContext"], None] = _no_validation
    # Names this scheme reads from ``ModelConfig.norm_kwargs``; anything else is a user error.
    accepts: tuple[str, ...] = ()
    # The QK-norm every model of this scheme has (``ModelConfig.qk_norm``; None: whatever the config says).
    qk_norm: str | None = None
    # What the norm is in a stock Hugging Face family, so an exporter asks the scheme and not its name:
    # "layernorm" (GPT-2's Pre-LN), "rmsnorm" (Llama's Pre-RMSNorm), "rms-sandwich" (Gemma's RMSNorm before and
    # after each sub-layer), "rms-post-sub" (OLMo 2's, after only), "identity" (no norm), None (no stock one).
    stock: str | None = None
    # True when no Pre-norm site normalizes any more: no norm at all, or what LayerNorm removal left.
    pre_norm_free: Callable[["NormContext"], bool] = _never
    # False for a scheme that exists for pretrained checkpoints (Gemma's RMSNorm sandwich): `workbench zoo`
    # trains it only when named.
    in_default_zoo: bool = True

    def check(self, ctx: "NormContext") -> None:
        unknown = sorted(set(ctx.kwargs) - set(self.accepts))
        if unknown:
            takes = f"only {', '.join(self.accepts)}" if self.accepts else "none"
            raise WorkbenchError(f"norm {self.name!r} does not take {unknown}; it takes {takes}")
        self.validate(ctx)

    def why_not_a_sum(self, ctx: "NormContext") -> str:
        """Why the final residual is not a sum of head and neuron outputs (for the one-line refusals)."""
        if any(self.placement(ctx, layer) == "post" for layer in range(ctx.n_layers)):
            return "its Post-LN blocks normalize the residual stream"
        return "its norms on sub-layer outputs rescale every head's and neuron's output by a live scale"

    def post_blocks(self, ctx: "NormContext") -> list[int]:
        """The blocks that normalize the residual stream itself (Post-norm placement)."""
        return [layer for layer in range(ctx.n_layers) if self.placement(ctx, layer) == "post"]

    def components_through_frozen_norms(self, ctx: "NormContext") -> bool:
        """True when the final residual is a sum of head and neuron outputs once every norm on a
        sub-layer's output is frozen at its actual scale (Pre-norm and sandwich blocks; not Post-norm
        ones, whose norm divides the residual stream itself, every earlier component at once)."""
        return all(self.placement(ctx, layer) in ("pre", "peri") for layer in range(ctx.n_layers))

    def residual_is_sum(self, ctx: "NormContext") -> bool:
        """True when resid_post of the last block is embed + pos_embed + every sub-layer output."""
        return all(self.placement(ctx, layer) == "pre" for layer in range(ctx.n_layers))


_REGISTRY: dict[str, NormScheme] = {}


def register(scheme: NormScheme) -> NormScheme:
    if scheme.name in _REGISTRY:
        raise ValueError(f"normalization scheme {scheme.name!r} is registered twice")
    _REGISTRY[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> NormScheme:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise WorkbenchError(
            f"unknown norm {name!r}; choose one of: {', '.join(_REGISTRY)} (see `workbench norms`)"
        ) from None


def scheme_names() -> list[str]:
    return list(_REGISTRY)


def all_schemes() -> list[NormScheme]:
    return list(_REGISTRY.values())
