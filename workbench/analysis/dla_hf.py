"""Direct logit attribution on a Hugging Face Llama-architecture model (SmolLM2 and its RMSNorm-free
version), through forward hooks on its own modules.

The final residual (the input of ``model.norm``) is the token embedding plus every head's share of
``o_proj`` plus every MLP output (Llama has no biases and rotary positions, so nothing else). DLA reads
each component through the RMSNorm frozen at the actual residual; the direct effect removes it and
recomputes the norm — the same definitions as ``workbench.analysis.dla`` for our own models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import WorkbenchError
from ..tokenizer import EOT
from .dla import DLAResult, _row


def hf_tokens(tokenizer, text: str) -> Tensor:
    """<|endoftext|> at position 0 (as in the workbench's data), then the text."""
    bos = tokenizer.token_to_id(EOT)
    ids = ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor([ids])


def _single(tokenizer, s: str) -> int:
    ids = tokenizer.encode(s, add_special_tokens=False).ids
    if len(ids) != 1:
        raise WorkbenchError(f"{s!r} is {len(ids)} tokens, not one; pick a string that is a single token")
    return ids[0]


@torch.no_grad()
def direct_logit_attribution_hf(hf: nn.Module, tokenizer, prompt: str, answer: str | int | None = None,
                                contrast: str | int | None = None, pos: int = -1) -> DLAResult:
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "o_proj"):
        raise WorkbenchError(f"{type(hf).__name__} is not a Llama-architecture model; DLA on HF models needs one")
    tokens = hf_tokens(tokenizer, prompt)
    cfg = hf.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if tokens.shape[1] > getattr(cfg, "max_position_embeddings", 1 << 30):
        raise WorkbenchError(f"the prompt has {tokens.shape[1]} tokens, more than the model's context")
    got: dict[str, Tensor] = {}
    handles = [hf.model.embed_tokens.register_forward_hook(lambda m, i, o: got.__setitem__("embed", o[0, pos])),
               hf.model.norm.register_forward_pre_hook(lambda m, a: got.__setitem__("final", a[0][0, pos]))]
    for l, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(f"z{l}", a[0][0, pos])))
        handles.append(layer.mlp.register_forward_hook(lambda m, i, o, l=l: got.__setitem__(f"mlp{l}", o[0, pos])))
    try:
        logits = hf(input_ids=tokens, use_cache=False).logits[0, pos]
    finally:
        for h in handles:
            h.remove()
    a = int(logits.argmax()) if answer is None else (_single(tokenizer, answer) if isinstance(answer, str) else int(answer))
    W = hf.lm_head.weight
    direction = W[a].clone()
    if contrast is not None:
        direction -= W[_single(tokenizer, contrast) if isinstance(contrast, str) else int(contrast)]
    if getattr(hf.lm_head, "bias", None) is not None:
        raise WorkbenchError("an lm_head with a bias is not supported")
    names, vecs = ["embed"], [got["embed"]]
    for l, layer in enumerate(layers):
        o = layer.self_attn.o_proj
        z = got[f"z{l}"].reshape(n_heads, d_head)
        heads = torch.einsum("hd,mhd->hm", z, o.weight.reshape(o.weight.shape[0], n_heads, d_head))
        names += [f"L{l}H{h}" for h in range(n_heads)]
        vecs += list(heads)
        if o.bias is not None:
            names.append(f"L{l}.attn.b_O")
            vecs.append(o.bias)
        names.append(f"L{l}.mlp")
        vecs.append(got[f"mlp{l}"])
    comps, final = torch.stack(vecs).float(), got["final"].float()
    if not torch.allclose(comps.sum(0), final, atol=1e-3 * max(1.0, final.abs().max().item())):
        raise RuntimeError("components do not sum to the final residual; the decomposition is incomplete")
    eps, gain = _rms_parameters(hf.model.norm)

    def logit_of(x: Tensor) -> Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain * direction).sum(-1)

    scale = torch.rsqrt(final.pow(2).mean() + eps)
    dla = (comps * scale * gain * direction).sum(-1)
    logit = logit_of(final)
    direct = logit - logit_of(final[None, :] - comps)
    nmae = ((dla - direct).abs().mean() / direct.abs().mean().clamp_min(1e-30)).item()
    table = _table(names, dla.tolist(), direct.tolist())
    return DLAResult(logit=logit.item(), dla_sum=dla.sum().item(), nmae=nmae, table=table)


def _rms_parameters(norm: nn.Module) -> tuple[float, Tensor]:
    """ε and gain of the final RMSNorm: Hugging Face's module, or the workbench ``Norm`` swapped in
    by ``HookedLlama`` (same computation)."""
    from ..norms import Affine, Norm

    if isinstance(norm, Norm):
        return float(norm.standardize.eps), (norm.affine.w if isinstance(norm.affine, Affine) else torch.ones(1)).float()
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))), norm.weight.float()


def _table(names, dla, de):
    import pandas as pd

    return pd.DataFrame([_row(n, d, e) for n, d, e in zip(names, dla, de)])
