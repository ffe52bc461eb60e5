"""Training checkpoints as data: tensors in safetensors, everything else as JSON in the same file's header.

A checkpoint someone sends you must not be able to run code on your machine, so nothing here unpickles.
A checkpoint is one ``.safetensors`` file (written atomically, so a kill never leaves a checkpoint whose
tensors and bookkeeping disagree): its tensors are the leaves of the saved state, and the header's
``workbench_checkpoint`` entry is JSON of the state's structure with every tensor replaced by a reference
``{"__tensor__": name}``. Only the types a training state is made of round-trip — dict, list, tuple, str,
int, float (NaN and ±inf included), bool, None and tensors — and they round-trip exactly: the floats of
the metrics and the optimizer's hyper-parameters through JSON's shortest repr, the tensors bit for bit.

Legacy ``checkpoint.pt`` files (pickles written by workbench ≤ 0.1) are read only when the user says
they trust them, and even then through torch's restricted ``weights_only`` unpickler, which refuses any
callable a pickle names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import WorkbenchError

FORMAT = "workbench-checkpoint/1"
_HEADER_KEY = "workbench_checkpoint"


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        # safetensors refuses two names over one storage (tied weights): the second one gets a copy.
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen[t.untyped_storage().data_ptr()] = path
        tensors[path] = t
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors, seen) for k, v in obj.items()}
        # Non-string keys (the optimizer's per-parameter state is keyed by int) keep their type.
        return {"__items__": [[_encode(k, f"{path}.k{i}", tensors, seen), _encode(v, f"{path}.{i}", tensors, seen)]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"a checkpoint holds only tensors, numbers, strings, lists and dicts; {path} is {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file beside it, then rename)."""
    from .io import replace_atomically

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "s", tensors, {})
    header = {"format": FORMAT, "state": tree}
    replace_atomically(Path(path), lambda tmp: save_file(tensors, tmp, metadata={_HEADER_KEY: json.dumps(header)}))


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a damaged or foreign file is a one-line error."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(meta[_HEADER_KEY])
        if header.get("format") != FORMAT:
            raise KeyError("format")
        return _decode(header["state"], tensors)
    except FileNotFoundError:
        raise WorkbenchError(f"checkpoint {path} is missing; re-train the run") from None
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise WorkbenchError(
            f"checkpoint {path} is corrupt or not a workbench checkpoint ({e.__class__.__name__}); delete its "
            "run directory and re-train"
        ) from None


def read_header_entry(path: str | Path, key: str) -> Any:
    """One tensor-free entry of a checkpoint's state, read from the header alone (no tensor is loaded)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = json.loads((f.metadata() or {})[_HEADER_KEY])
        if header.get("format") != FORMAT:
            raise KeyError("format")
        return _decode(header["state"].get(key), {})
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise WorkbenchError(f"checkpoint {path} is corrupt or not a workbench checkpoint ({e.__class__.__name__}); "
                             f"delete {path.parent} and start again") from None


def load_legacy(path: str | Path, trust_pickle: bool) -> dict[str, Any]:
    """A workbench ≤ 0.1 ``checkpoint.pt``: refused unless the user trusts it; then read without callables."""
    path = Path(path)
    if not trust_pickle:
        raise WorkbenchError(
            f"{path} is a pickle checkpoint (workbench ≤ 0.1), and loading a pickle can run code; resume it only "
            "if you trust where it came from, with --trust-pickle, or choose a new --out directory"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError… for refused or damaged pickles
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
        raise WorkbenchError(
            f"{path} is not a plain-tensor checkpoint and was not loaded ({first}); choose a new --out directory"
        ) from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= state.keys():
        raise WorkbenchError(f"{path} is not a workbench checkpoint; choose a new --out directory")
    return state
