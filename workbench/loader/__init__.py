"""From a model spec to the one model surface.

``load(spec)`` returns a ``workbench.model.GPT`` — a TransformerLens ``HookedRootModule`` with the
workbench's norms and hook names (see ``workbench.surface.HookedModel``) — for every spec:

* a run directory written by ``workbench train`` / ``remove-ln`` / ``convert``;
* a Hugging Face directory of a supported family (``config.json`` + safetensors or a tensor-only
  ``pytorch_model.bin``): GPT-2, Llama (SmolLM2), Qwen2, Qwen3, Mistral, GPT-NeoX (Pythia), Gemma 2,
  Gemma 3 (text) and OLMo-2;
* ``smollm2`` (the GGUF fetched by ``workbench fetch smollm2``) and ``hf:NAME`` (the hub cache).

Family differences live in one adapter file each (``gpt2.py``, ``llama.py``, ``gpt_neox.py``, ``qwen3.py``,
``gemma.py``, ``olmo2.py``): how the
config and the weights map onto the workbench's model and, where the family has one, the exporter back
to its stock format. Nothing downstream of this package knows which family a model came from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import WorkbenchError
from ..model import GPT, sink
from .family import Family
from .gpt2 import GPT2
from .gemma import GEMMA2, GEMMA3
from .gpt_neox import GPT_NEOX
from .hub import fetch_smollm2, is_hf_spec, locate, read_checkpoint, read_config, smollm2_cached
from .llama import LLAMA, MISTRAL, QWEN2
from .olmo2 import OLMO2
from .qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (GPT2, LLAMA, QWEN2, QWEN3, MISTRAL, GPT_NEOX, GEMMA2, GEMMA3, OLMO2)


def supported() -> str:
    return ", ".join(t for f in FAMILIES for t in f.model_types)


def family_of(config: dict) -> Family:
    model_type = config.get("model_type")
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise WorkbenchError(f"model family {model_type!r} is not supported; supported families: {supported()}")


def family_named(name: str) -> Family | None:
    """The adapter of a model's ``cfg.family`` (None for the workbench's own models)."""
    return next((f for f in FAMILIES if f.name == name), None)


def load(spec: str | Path, device: str | torch.device = "cpu", n_ctx: int | None = None,
         download: bool = True) -> GPT:
    """The model of ``spec`` (see the module docstring), in eval mode on ``device``.

    ``n_ctx``: the working context of a rotary model (default ``min(its maximum, 256)``); ignored for
    learned positions, whose table fixes it. ``download=False`` (the dashboard): read only, never reach
    the network — an ``hf:NAME`` not in the Hugging Face cache is refused in one line (``smollm2`` is
    never fetched by ``load``: ``workbench fetch smollm2`` does that)."""
    from ..io import load_run

    s = str(spec)
    if not is_hf_spec(s):
        if not Path(s).exists():
            raise WorkbenchError(f"unknown model spec {s!r} (not found): give a run directory, a Hugging Face "
                                 "directory, smollm2 or hf:NAME")
        return load_run(s, device=device)
    d, gguf = locate(s, download)
    config = read_config(d) if gguf is None else None  # a GGUF holds its own config; nothing beside it is read
    if config is not None:
        family_of(config)  # an unsupported family is refused before its weights are read
    ckpt = read_checkpoint(s, download)
    family = family_of(ckpt.config)
    try:
        kwargs = family.config(ckpt.config)
        if n_ctx is not None and kwargs.get("pos") == "rope":
            kwargs["n_ctx"] = min(n_ctx, ckpt.config.get("max_position_embeddings", n_ctx))
        cfg = ModelConfig(**kwargs, bos_token=ckpt.bos_token)
        state = family.weights(ckpt.state_dict, cfg, ckpt.config)
    except KeyError as e:  # a config field or a tensor the family needs is not in the checkpoint
        raise WorkbenchError(f"the {family.name} checkpoint {s} is incomplete: it has no {e.args[0]!r}") from None
    if ckpt.tokenizer is not None and ckpt.tokenizer.get_vocab_size() > cfg.d_vocab:
        raise WorkbenchError(f"the tokenizer of {s} has {ckpt.tokenizer.get_vocab_size()} tokens but the model embeds "
                             f"only {cfg.d_vocab}: it is not this model's tokenizer")
    model = GPT(cfg, ckpt.tokenizer)
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise WorkbenchError(f"the {family.name} checkpoint {s} does not match its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if family.finish is not None:
        model = family.finish(model, ckpt.config)
    model.name = s
    return sink.beside(model, d).to(device).eval()


def export(model: GPT, out: str | Path, check_tokens: torch.Tensor | None = None) -> dict:
    """Write ``model`` as a stock Hugging Face directory of its family (GPT-2 for the workbench's own
    Pre-LN and LN-free models); returns what the exporter measured (``max_abs_logit_diff``, ...). The
    directory is read back by transformers and compared with ``model`` on ``check_tokens`` (default: fixed
    random tokens) before it appears; a difference above ``EXPORT_TOLERANCE`` refuses, nothing written."""
    family = family_named(model.cfg.family) or GPT2
    if family.export is None:
        raise WorkbenchError(f"the {family.name} family has no exporter; models of it are saved as workbench run "
                             "directories")
    return family.export(model, Path(out), check_tokens)


__all__ = ["FAMILIES", "Family", "export", "family_named", "family_of", "fetch_smollm2", "is_hf_spec", "load",
           "smollm2_cached", "supported"]
