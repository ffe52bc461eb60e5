"""An exact attention-sink prefix: position 0 computed once, then attended to as a fixed key/value prefix.

Under causal attention position 0 sees only itself, so when it always holds the same token its residual
stream, its keys and values at every layer and its logits are constants of the weights. A model made
norm-free *except at position 0* (``remove-ln --sink-prefix``: that position keeps its live norms to the
end, so SmolLM2's massive activation there never meets a frozen scale) is therefore exactly a norm-free
model for positions ≥ 1 plus this prefix:

    keys, values  [layer, kv_head, d_head]  position 0's keys (after QK-norm and the rotation at
                                            position 0, the identity) and values at every layer
    logits        [d_vocab]                  position 0's logits (its prediction of the first token)
    token         int                        the token position 0 always holds

``attach`` makes a ``GPT`` attend to it: the input must then start with ``token``; positions ≥ 1 are
computed (rotated from position 1 on) and attend to the prefix as key position 0, and position 0's logits
are the stored ones. Direct logit attribution at positions ≥ 1 stays exact: with the pattern fixed, what
a head reads from the constant value is a per-head bias carried by ``hook_z``.

On disk (``SINK_FILE`` beside a stock or run directory): a safetensors file with those three tensors and
the token in its metadata, which ``stock_cache`` turns into a transformers ``DynamicCache`` of length 1
(docs/ln_removal.md has the lines that ``generate`` with it without the workbench).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import WorkbenchError

if TYPE_CHECKING:
    from .gpt import GPT

SINK_FILE = "sink_prefix.safetensors"
FORMAT = "workbench-sink-prefix-1"


@dataclass
class SinkPrefix:
    token: int
    keys: Float[Tensor, "layer kv_head d_head"]
    values: Float[Tensor, "layer kv_head d_head"]
    logits: Float[Tensor, "d_vocab"]

    def check(self, model: "GPT") -> None:
        """Refuse, in one line, a prefix that is not one of ``model``'s."""
        cfg = model.cfg
        shape = (cfg.n_layers, cfg.n_key_value_heads, cfg.d_head)
        if tuple(self.keys.shape) != shape or tuple(self.values.shape) != shape:
            raise WorkbenchError(f"the sink prefix holds keys {tuple(self.keys.shape)} and values "
                                 f"{tuple(self.values.shape)}, but the model needs {shape} (layer, K/V head, d_head); "
                                 "it was written for another model")
        if tuple(self.logits.shape) != (cfg.d_vocab,) or not 0 <= self.token < cfg.d_vocab:
            raise WorkbenchError(f"the sink prefix's logits {tuple(self.logits.shape)} or token {self.token} do not fit "
                                 f"the model's vocabulary of {cfg.d_vocab}; it was written for another model")
        if not all(torch.isfinite(t).all() for t in (self.keys, self.values, self.logits)):
            raise WorkbenchError("the sink prefix is not finite (position 0 overflowed); it cannot be used")


@torch.no_grad()
def capture(model: "GPT", token: int, before: Callable[[Tensor], None] | None = None) -> SinkPrefix:
    """Position 0's keys, values and logits in ``model`` when it holds ``token`` (``before`` runs on the
    one-token input first, e.g. to set the special positions of a model still being made norm-free)."""
    if getattr(model, "sink_token", None) is not None:
        raise WorkbenchError("the model already attends to a sink prefix; capture it from the model that computes "
                             "position 0")
    tokens = torch.tensor([[token]], device=model.W_U.device)
    if before is not None:
        before(tokens)
    rotary = model.cfg.pos == "rope"
    k_hooks = [f"blocks.{i}.attn.hook_rot_k" if rotary else f"blocks.{i}.attn.hook_k" for i in range(model.cfg.n_layers)]
    v_hooks = [f"blocks.{i}.attn.hook_v" for i in range(model.cfg.n_layers)]
    keep = set(k_hooks + v_hooks)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in keep)
    stack = lambda names: torch.stack([cache[n][0, 0].float().cpu() for n in names])  # noqa: E731
    return SinkPrefix(int(token), stack(k_hooks), stack(v_hooks), logits[0, 0].float().cpu())


def attach(model: "GPT", prefix: SinkPrefix) -> "GPT":
    """Make ``model`` attend to ``prefix`` (in place; returns it): see the module docstring."""
    prefix.check(model)
    device = model.W_U.device
    for layer, block in enumerate(model.blocks):
        block.attn.sink_k = prefix.keys[layer].to(device)
        block.attn.sink_v = prefix.values[layer].to(device)
    model.sink_logits = prefix.logits.to(device)
    model.sink_token = prefix.token
    return model


def read_beside(directory: Path) -> SinkPrefix | None:
    """The prefix written beside the weights in ``directory``, or None."""
    path = Path(directory) / SINK_FILE
    return read(path) if path.is_file() else None


def beside(model: "GPT", directory: Path) -> "GPT":
    """``model`` attending to the prefix written beside its weights in ``directory``, if there is one."""
    prefix = read_beside(directory)
    return model if prefix is None else attach(model, prefix)


def prefix_of(model: "GPT") -> SinkPrefix | None:
    """The prefix ``model`` attends to, or None."""
    if getattr(model, "sink_token", None) is None:
        return None
    return SinkPrefix(model.sink_token, torch.stack([b.attn.sink_k.cpu() for b in model.blocks]),
                      torch.stack([b.attn.sink_v.cpu() for b in model.blocks]), model.sink_logits.cpu())


def check_input(model: "GPT", tokens: Int[Tensor, "batch pos"]) -> None:
    """A sink model's input starts with its sink token; anything else is refused in one line."""
    if tokens.shape[-1] < 1 or not bool((tokens[:, 0] == model.sink_token).all()):
        raise WorkbenchError(f"this model's position 0 is a fixed attention-sink prefix: every input must start with "
                             f"token {model.sink_token} (to_tokens prepends it)")


def save(prefix: SinkPrefix, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"keys": prefix.keys.float().contiguous(), "values": prefix.values.float().contiguous(),
               "logits": prefix.logits.float().contiguous()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "token_id": str(prefix.token)})


def read(path: Path) -> SinkPrefix:
    """A prefix file, refused in one line when it is not one (tensors only: nothing in it is executed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise WorkbenchError(f"{path} is not a sink-prefix file ({e}); write it again with remove-ln --sink-prefix") from None
    if meta.get("format") != FORMAT or not {"keys", "values", "logits"} <= set(tensors) \
            or not str(meta.get("token_id", "")).isdigit():
        raise WorkbenchError(f"{path} is not a {FORMAT} file (format {meta.get('format')!r}); write it again with "
                             "remove-ln --sink-prefix")
    return SinkPrefix(int(meta["token_id"]), tensors["keys"], tensors["values"], tensors["logits"])


def stock_cache(prefix: SinkPrefix, hf_config, batch: int = 1):
    """The prefix as a transformers ``DynamicCache`` of one position for ``batch`` sequences (a fresh one per
    call: generation appends to it)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_config)
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        cache.update(k[None, :, None].expand(batch, -1, -1, -1).contiguous(),
                     v[None, :, None].expand(batch, -1, -1, -1).contiguous(), layer)
    return cache


@torch.no_grad()
def stock_logits(hf, prefix: SinkPrefix, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
    """What a stock transformers model computes with the prefix: position 0's stored logits, then the model
    run on positions ≥ 1 with the prefix as its cache."""
    if not bool((tokens[:, 0] == prefix.token).all()):
        raise WorkbenchError(f"the input must start with the sink token {prefix.token}")
    rest = hf(input_ids=tokens[:, 1:], cache=stock_cache(prefix, hf.config, tokens.shape[0])).logits.float()
    return torch.cat([prefix.logits.float().expand(tokens.shape[0], 1, -1), rest], dim=1)


def stock_forward(hf, directory: Path) -> Callable[[Tensor], Tensor]:
    """tokens → logits of a stock transformers model read from ``directory``, behind its prefix if it has one."""
    prefix = read_beside(directory)
    if prefix is None:
        return lambda tokens: hf(input_ids=tokens).logits
    return lambda tokens: stock_logits(hf, prefix, tokens)


__all__ = ["SINK_FILE", "SinkPrefix", "attach", "beside", "read_beside", "stock_forward", "capture", "check_input", "prefix_of", "read", "save", "stock_cache",
           "stock_logits"]
