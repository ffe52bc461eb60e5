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

SUPPORTED = "pre-ln, lns, pre-rms, pre-crms, srms and the Pre-LN blocks of mix-ln"


def check_removable(cfg: ModelConfig) -> None:
    """Refuse, in one line, every model whose norms remove-ln cannot freeze."""
    if cfg.scheme.pre_norm_free(cfg.norm_context):
        raise WorkbenchError(f"the model is already LayerNorm-free (norm {cfg.norm!r}); there is nothing to remove")
    if cfg.qk_norm is not None:
        raise WorkbenchError(f"remove-ln does not remove QK-norms yet (blocks.*.attn.q_norm / k_norm, qk_norm="
                             f"{cfg.qk_norm!r}); supported: {SUPPORTED}")
    pre = [layer for layer in range(cfg.n_layers) if cfg.scheme.placement(cfg.norm_context, layer) == "pre"]
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
            if block.placement == "pre" and block.ln1_v is None:
                block.ln1_v = copy.deepcopy(block.ln1)
            if split_mlp and block.placement == "pre" and block.ln2_up is None:
                block.ln2_up = copy.deepcopy(block.ln2)
        net.setup()  # register the new hook points
        self.net = net
        self.tokenizer = model.tokenizer
        self.eot_id = model.tokenizer.token_to_id(EOT) if model.tokenizer is not None else None
        self.n_ctx = n_ctx or model.cfg.n_ctx  # the fine-tuning window
        pre = [b for b in net.blocks if b.placement == "pre"]
        self.sites = standard_schedule(
            ln2=[NormSite(f"blocks.{b.layer}.ln2", b.ln2, "mlp") for b in pre],
            ln1_qk=[NormSite(f"blocks.{b.layer}.ln1", b.ln1) for b in pre],
            ln1_v=[NormSite(f"blocks.{b.layer}.ln1_v", b.ln1_v) for b in pre],
            final=NormSite("ln_final", net.ln_final),
            ln2_up=[NormSite(f"blocks.{b.layer}.ln2_up", b.ln2_up, "mlp") for b in pre] if split_mlp else None,
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
