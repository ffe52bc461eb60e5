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
from ..norms.mix_ln import MIX_LN
from ..tokenizer import EOT
from .fold import fold_heads, fold_reader, norm_as_affine, set_
from .schedule import NormSite, standard_schedule

SUPPORTED = "pre-ln, lns, pre-rms, pre-crms, srms and the Pre-LN blocks of mix-ln"


def check_removable(cfg: ModelConfig) -> None:
    """Refuse, in one line, every model whose norms remove-ln cannot freeze."""
    if cfg.norm == "none" or cfg.norm_kwargs.get("pre_ln_free"):
        raise WorkbenchError(f"the model is already LayerNorm-free (norm {cfg.norm!r}); there is nothing to remove")
    pre = [layer for layer in range(cfg.n_layers) if cfg.scheme.placement(cfg, layer) == "pre"]
    if not pre:
        raise WorkbenchError(
            f"remove-ln needs a Pre-norm model; {cfg.norm!r} normalizes the residual stream itself, so a "
            f"frozen scale would rescale everything before it (supported: {SUPPORTED})"
        )
    if not cfg.scheme.scale_is_per_token:
        raise WorkbenchError(
            f"norm {cfg.norm!r} has no per-token scale to freeze (it is not a LayerNorm/RMSNorm); "
            f"remove-ln supports {SUPPORTED}"
        )


class GPTRemoval:
    """The sites of a GPT, in the removal order, on a copy whose ln1 is split into Q/K and V paths."""

    def __init__(self, model: GPT):
        check_removable(model.cfg)
        self.original_cfg = model.cfg
        net = copy.deepcopy(model)
        net.cfg = dataclasses.replace(model.cfg, split_ln1_v=True)
        for block in net.blocks:
            if block.placement == "pre" and block.ln1_v is None:
                block.ln1_v = copy.deepcopy(block.ln1)
        net.setup()  # register the new hook points
        self.net = net
        self.tokenizer = model.tokenizer
        self.eot_id = model.tokenizer.token_to_id(EOT) if model.tokenizer is not None else None
        self.n_ctx = model.cfg.n_ctx
        pre = [b for b in net.blocks if b.placement == "pre"]
        self.sites = standard_schedule(
            ln2=[NormSite(f"blocks.{b.layer}.ln2", b.ln2) for b in pre],
            ln1_qk=[NormSite(f"blocks.{b.layer}.ln1", b.ln1) for b in pre],
            ln1_v=[NormSite(f"blocks.{b.layer}.ln1_v", b.ln1_v) for b in pre],
            final=NormSite("ln_final", net.ln_final),
        )
        self.final_norm: Norm = net.ln_final

    def shard_units(self) -> list[nn.Module]:
        return list(self.net.blocks)

    def logits(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    @torch.no_grad()
    def fold(self) -> GPT:
        """The LN-free GPT: every frozen norm folded into its readers, no norm module left."""
        src, cfg = self.net, self.original_cfg
        if cfg.norm == MIX_LN.name:
            new_cfg = dataclasses.replace(cfg, norm_kwargs={**cfg.norm_kwargs, "pre_ln_free": True}, split_ln1_v=False)
        else:
            new_cfg = dataclasses.replace(cfg, norm="none", norm_kwargs={}, split_ln1_v=False)
        out = GPT(new_cfg, self.tokenizer).to(src.W_U.device)
        own = {k: v for k, v in src.state_dict().items() if ".ln" not in k and not k.startswith("ln_final")}
        post_norms = {k: v for k, v in src.state_dict().items()
                      if any(k.startswith(f"blocks.{b.layer}.ln") for b in src.blocks if b.placement == "post")}
        missing, unexpected = out.load_state_dict({**own, **post_norms}, strict=False)
        if unexpected or any(".ln" not in k and not k.startswith("ln_final") for k in missing):
            raise RuntimeError(f"fold lost weights: missing {missing}, unexpected {unexpected}")
        d = cfg.d_model
        for b_src, b_out in zip(src.blocks, out.blocks):
            if b_src.placement != "pre":
                continue
            qk, v, mlp = (norm_as_affine(n, d) for n in (b_src.ln1, b_src.ln1_v, b_src.ln2))
            a_src, a_out = b_src.attn, b_out.attn
            for W, bias, m in (("W_Q", "b_Q", qk), ("W_K", "b_K", qk), ("W_V", "b_V", v)):
                Wf, bf = fold_heads(m, getattr(a_src, W), getattr(a_src, bias))
                set_(getattr(a_out, W), Wf)
                set_(getattr(a_out, bias), bf)
            Wf, bf = fold_reader(mlp, b_src.mlp.W_in, b_src.mlp.b_in)
            set_(b_out.mlp.W_in, Wf)
            set_(b_out.mlp.b_in, bf)
        Wf, bf = fold_reader(norm_as_affine(src.ln_final, d), src.W_U, src.b_U)
        set_(out.unembed.W_U, Wf)
        set_(out.unembed.b_U, bf)
        return out.eval()


def is_norm_free(model: nn.Module) -> bool:
    """True when no module of ``model`` computes a statistic or holds a norm parameter."""
    from ..norms import IdentityStandardize

    for m in model.modules():
        if isinstance(m, Norm) and (not isinstance(m.standardize, IdentityStandardize) or any(True for _ in m.parameters())):
            return False
    return True
