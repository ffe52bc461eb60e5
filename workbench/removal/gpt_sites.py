"""LayerNorm removal on the workbench's own GPT family: where the norms are, and the final fold."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import WorkbenchError
from ..model import GPT
from ..norms import Norm
from ..model.fold import fold_norms
from ..tokenizer import EOT
from .schedule import NormSite, standard_schedule

SUPPORTED = ("pre-ln, lns, pre-rms, pre-crms, srms, the Pre-LN blocks of mix-ln and sandwich blocks (peri-ln, "
             "peri-rms, post-sub: Gemma, OLMo 2)")
# Blocks whose every norm one frozen scale can stand in for: norms on sub-layer inputs and outputs, not on
# the residual stream itself (Post-norm).
REMOVABLE = ("pre", "peri")


def check_removable(cfg: ModelConfig) -> None:
    """Refuse, in one line, every model whose norms remove-ln cannot freeze."""
    if cfg.scheme.pre_norm_free(cfg.norm_context):
        raise WorkbenchError(f"the model is already LayerNorm-free (norm {cfg.norm!r}); there is nothing to remove")
    pre = [layer for layer in range(cfg.n_layers) if cfg.scheme.placement(cfg.norm_context, layer) in REMOVABLE]
    if not pre:
        raise WorkbenchError(
            f"remove-ln needs a Pre-norm model; {cfg.norm!r}: {cfg.scheme.why_not_a_sum(cfg.norm_context)}, "
            f"which one frozen scale cannot stand in for (supported: {SUPPORTED})"
        )
    if not cfg.scheme.scale_is_per_token:
        raise WorkbenchError(
            f"norm {cfg.norm!r} has no per-token scale to freeze (it is not a LayerNorm/RMSNorm); "
            f"remove-ln supports {SUPPORTED}"
        )


class GPTRemoval:
    """The sites of a GPT, in the removal order, on a copy whose ln1 is split into Q/K and V paths."""

    def __init__(self, model: GPT, n_ctx: int | None = None, split_mlp: bool = False):
        check_removable(model.cfg)
        if split_mlp and model.cfg.mlp != "swiglu":
            raise WorkbenchError(f"--split-mlp needs a gated (SwiGLU) MLP, whose up path can be frozen apart from "
                                 f"its gate; this model's MLP is {model.cfg.mlp}")
        self.original_cfg = model.cfg
        net = copy.deepcopy(model)
        net.cfg = dataclasses.replace(model.cfg, split_ln1_v=True, split_ln2_up=split_mlp)
        for block in net.blocks:
            if block.placement in REMOVABLE and block.ln1_v is None:
                block.ln1_v = copy.deepcopy(block.ln1)
            if split_mlp and block.placement in REMOVABLE and block.ln2_up is None:
                block.ln2_up = copy.deepcopy(block.ln2)
        net.setup()  # register the new hook points
        self.net = net
        self.tokenizer = model.tokenizer
        self.eot_id = model.tokenizer.token_to_id(EOT) if model.tokenizer is not None else None
        self.n_ctx = n_ctx or model.cfg.n_ctx  # the fine-tuning window
        pre = [b for b in net.blocks if b.placement in REMOVABLE]
        peri = [b for b in pre if b.placement == "peri"]

        def sites(name: str, kind: str = "other", blocks=pre) -> list[NormSite]:
            # an identity (OLMo 2's missing pre-norms) has no scale to freeze
            found = [NormSite(f"blocks.{b.layer}.{name}", b.get_submodule(name), kind) for b in blocks]
            return [s for s in found if not s.norm.standardize.is_identity]

        qk = [b for b in pre if b.attn.q_norm is not None]

        self.sites = standard_schedule(
            ln2=sites("ln2", "mlp"), ln1_qk=sites("ln1"), ln1_v=sites("ln1_v"),
            final=NormSite("ln_final", net.ln_final),
            ln2_up=sites("ln2_up", "mlp") if split_mlp else None,
            post=sites("ln2_post", blocks=peri) + sites("ln1_post", blocks=peri),
            qk=sites("attn.q_norm", "qk", qk) + sites("attn.k_norm", "qk", qk),
        )
        self.final_norm: Norm = net.ln_final

    def shard_units(self) -> list[nn.Module]:
        return list(self.net.blocks)

    def logits(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    @torch.no_grad()
    def fold(self) -> GPT:
        """The LN-free GPT: every frozen norm folded into its readers, no norm module left."""
        return fold_norms(self.net)
