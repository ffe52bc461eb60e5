"""The removal order of Baroni et al. (2025): the MLP norms first, then attention's Q/K path, then its
V path, then the final norm; the special positions (BOS, end-of-text) lose their own scale last."""

from __future__ import annotations

from dataclasses import dataclass

from ..norms import Norm

SPECIAL_OFF = "special positions"


@dataclass
class NormSite:
    name: str  # module path, e.g. "blocks.3.ln1_v"
    norm: Norm


def standard_schedule(ln2: list[NormSite], ln1_qk: list[NormSite], ln1_v: list[NormSite],
                      final: NormSite) -> list[NormSite]:
    return [*ln2, *ln1_qk, *ln1_v, final]


def schedule_names(sites: list[NormSite]) -> list[str]:
    return [s.name for s in sites] + [SPECIAL_OFF]
