"""How a field of the removal method becomes a ``remove-ln`` flag: its default and help, written once."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, flag: str | None = None) -> Any:
    """A dataclass field that is also a flag (``--name-with-dashes`` unless ``flag`` names it)."""
    return field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


__all__ = ["opt"]
