"""TransformerLens' ActivationCache, refusing what a normalization makes meaningless."""

from __future__ import annotations

from transformer_lens.ActivationCache import ActivationCache

from ..errors import WorkbenchError


class NormAwareCache(ActivationCache):
    """``ActivationCache`` that says no instead of returning wrong numbers.

    - Post-LN / Mix-LN: the final residual is not a sum of component outputs (norms sit on the
      residual path), so decompositions and logit attributions are undefined.
    - DyT, BatchNorm, PowerNorm, Unified: the final norm is not a per-token division TL can replay
      from ``hook_scale``; decompositions work, applying the norm to them does not.
    - Soft-capped output logits (Gemma 2): not linear in the residual, so there are no logit attributions.
    """

    def _require_sum(self, what: str) -> None:
        cfg = self.model.cfg
        if not cfg.scheme.residual_is_sum(cfg.norm_context):
            raise WorkbenchError(
                f"{what} is undefined for norm {cfg.norm!r}: {cfg.scheme.why_not_a_sum(cfg.norm_context)}, so "
                "it is not a sum of component outputs; use a Pre-norm or norm-free model"
            )

    def _require_token_scale(self, what: str) -> None:
        cfg = self.model.cfg
        if not cfg.scheme.scale_is_per_token:
            raise WorkbenchError(
                f"{what} with the final norm applied is undefined for norm {cfg.norm!r}: it is not a "
                "per-token scale that can be replayed from hook_scale; pass apply_ln=False"
            )

    # Decompositions need a residual stream that is a sum of components.
    def decompose_resid(self, *args, **kwargs):
        self._require_sum("decompose_resid")
        return super().decompose_resid(*args, **kwargs)

    def accumulated_resid(self, *args, **kwargs):
        self._require_sum("accumulated_resid")
        return super().accumulated_resid(*args, **kwargs)

    def stack_head_results(self, *args, **kwargs):
        self._require_sum("stack_head_results")
        return super().stack_head_results(*args, **kwargs)

    def get_full_resid_decomposition(self, *args, **kwargs):
        self._require_sum("get_full_resid_decomposition")
        return super().get_full_resid_decomposition(*args, **kwargs)

    # Every use of the cached norm scale (apply_ln=True anywhere, logit_attrs) passes through these.
    def apply_ln_to_stack(self, *args, **kwargs):
        self._require_sum("apply_ln_to_stack")
        self._require_token_scale("apply_ln_to_stack")
        return super().apply_ln_to_stack(*args, **kwargs)

    def _get_cached_ln_scale(self, *args, **kwargs):
        self._require_token_scale("applying the cached norm scale")
        return super()._get_cached_ln_scale(*args, **kwargs)

    def logit_attrs(self, *args, **kwargs):
        self._require_sum("logit_attrs")
        self._require_token_scale("logit_attrs")
        cap = self.model.cfg.output_logits_soft_cap
        if cap is not None:
            raise WorkbenchError(f"logit_attrs is undefined with final logit soft-capping ({cap:g}·tanh(logit / {cap:g})): "
                                 "the logits are not linear in the residual stream")
        return super().logit_attrs(*args, **kwargs)
