"""Run directories: atomic writes, saving and loading models."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import WorkbenchError
from .tokenizer import load_tokenizer
from .version import __version__

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.safetensors"  # workbench.checkpoint: tensors + JSON, no pickle
LEGACY_CHECKPOINT_FILE = "checkpoint.pt"  # workbench <= 0.1 wrote a pickle; read only with --trust-pickle


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` with the permissions a plain open() would give it."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` a file beside ``path``, then rename it over ``path`` with ordinary permissions
    (libraries such as safetensors create their files private)."""
    fd, tmp = _temp_beside(Path(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    replace_atomically(Path(path), lambda tmp: save_file(state, tmp))


def save_run(d: Path, model, record: dict[str, Any]) -> None:
    """A run directory any workbench command loads: config (with ``record``), tokenizer, weights."""
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / CONFIG_FILE, {"model": model.cfg.to_dict(), **record, "workbench_version": __version__})
    atomic_write_text(d / TOKENIZER_FILE, model.tokenizer.to_str())
    save_weights(model, d / MODEL_FILE)
    from .model import sink

    prefix = sink.prefix_of(model)
    if prefix is not None:  # the fixed position 0 the weights alone do not compute (remove-ln --sink-prefix)
        sink.save(prefix, d / sink.SINK_FILE)


def check_out_dir(out: Path) -> None:
    """A result directory must be new (or an empty directory): results are never written over."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} exists and is not a directory; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise WorkbenchError(f"--out {out} is not empty; choose a new directory")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Build a result directory in a temporary sibling and rename it into place when the block ends
    without an error; on any error (or a kill before the rename) ``out`` never exists half-written."""
    out = Path(out)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"{what} {path} is missing; is this a workbench run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"{what} {path} is corrupt ({e.__class__.__name__}); re-create the run") from None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Load the model of a run directory (``config.json`` + ``model.safetensors`` + ``tokenizer.json``)."""
    from .model import GPT

    d = Path(run_dir)
    if not d.is_dir():
        raise WorkbenchError(f"model {str(run_dir)!r} not found: give a run directory made by `workbench train`")
    record = read_json(d / CONFIG_FILE, "model config")
    if not isinstance(record, dict) or "model" not in record:
        raise WorkbenchError(f"model config {d / CONFIG_FILE} has no \"model\" table; re-create the run")
    cfg = ModelConfig.from_dict(record["model"])
    tokenizer = load_tokenizer(d / TOKENIZER_FILE)
    if not (d / MODEL_FILE).is_file():
        raise WorkbenchError(f"{d / MODEL_FILE} is missing; the run never saved weights (train it, or resume it)")
    try:
        state = load_file(str(d / MODEL_FILE), device=str(device))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise WorkbenchError(f"checkpoint {d / MODEL_FILE} is corrupt ({e}); re-train the model") from None
    model = GPT(cfg, tokenizer).to(device)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if wrong:
        raise WorkbenchError(f"checkpoint {d / MODEL_FILE} does not match its config ({wrong[0]} is "
                             f"{tuple(state[wrong[0]].shape)}, the config makes it {shapes[wrong[0]]}); re-train the model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WorkbenchError(
            f"checkpoint {d / MODEL_FILE} does not match its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); re-train the model"
        )
    from .model import sink

    return sink.beside(model, d).eval()
