"""Training precision: float32, or bfloat16 autocast over float32 master weights.

``bfloat16`` runs the matmuls in bf16 (``torch.autocast``) while parameters, gradients, the optimizer
state and the loss stay in float32, so a checkpoint of a bf16 run is the same kind of file as any other
and resuming it is exact. ``auto`` picks bfloat16 where the hardware computes it natively — a CUDA GPU
with bf16 support, or a CPU with ``avx512_bf16`` / ``amx_bf16`` — and float32 elsewhere, where bf16
would be emulated and slower. float16 is refused: it needs loss scaling, and every machine that has
fast float16 also has fast bfloat16.
"""

from __future__ import annotations

import contextlib
import sys
from functools import lru_cache
from pathlib import Path

import torch

from .errors import WorkbenchError

DTYPES = ("float32", "bfloat16")
CHOICES = ("auto", *DTYPES)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def check_dtype(name: str, allow_auto: bool = True) -> str:
    """``name`` if it is a training precision we support, else a one-line error naming the choices."""
    choices = CHOICES if allow_auto else DTYPES
    if name in choices:
        return name
    if name in ("float16", "half", "fp16"):
        raise WorkbenchError(f"--dtype {name} is not supported (float16 training needs loss scaling); "
                             f"use bfloat16, which is as fast wherever float16 is")
    raise WorkbenchError(f"unknown --dtype {name!r}; choose one of: {', '.join(choices)}")


@lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native bf16 instruction sets, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_bf16_flags())


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto`` → the fast precision of ``device``; anything else is checked and returned."""
    name = check_dtype(name)
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


# Measured: a `small` zoo step in bf16 on a CPU without AVX-512, where bf16 is emulated (issue 25).
EMULATED_SLOWDOWN = 2.8


def emulated(name: str, device: torch.device) -> str | None:
    """A line saying ``name`` will be emulated (and slow) on ``device``, or None where it is native."""
    if check_dtype(name) != "bfloat16" or native_bf16(device):
        return None
    what = f"this CPU has no {' or '.join(CPU_BF16_FLAGS)}" if device.type == "cpu" else \
        f"this {device.type} device has no native bf16"
    return (f"--dtype bfloat16 is emulated here ({what}): several times slower than float32 "
            f"({EMULATED_SLOWDOWN}× for a `small` step); --dtype auto picks float32 on this machine")


def warn_if_emulated(name: str, device: torch.device) -> None:
    """Say :func:`emulated`'s line once on stderr (the run goes on: it was asked for)."""
    line = emulated(name, device)
    if line is not None and line not in _SAID:
        _SAID.add(line)
        print(f"workbench: warning: {line}", file=sys.stderr)


_SAID: set[str] = set()


def why(name: str, device: torch.device) -> str:
    """One line saying which precision ``auto`` chose on this device, and why."""
    chosen = resolve_dtype(name, device)
    if name != "auto":
        return emulated(name, device) or f"{chosen} (asked for)"
    if chosen == "bfloat16":
        has = "a CUDA GPU with bf16" if device.type == "cuda" else f"a CPU with {'/'.join(cpu_bf16_flags())}"
        return f"bfloat16 autocast, float32 weights ({has}; --dtype float32 to turn it off)"
    return f"float32 (no native bf16 on this {device.type})"


def autocast(device: torch.device, dtype: str):
    """The context a forward pass runs under: nothing for float32, bf16 autocast otherwise."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=TORCH_DTYPES[dtype])
