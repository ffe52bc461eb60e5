"""Results computed on request (the dashboard's "compute it now" buttons), exactly as the CLI computes them.

A :class:`Job` is one result for one model: depth diagnostics (``workbench diagnose``), a ten-language
ranking (``workbench rank-languages``) or a LayerNorm removal (``workbench remove-ln``), with the command
that makes the same file, the file it writes (under the results directory, atomically) and an estimate of
its time. The estimate decides what a page offers to run: a job expected to finish within
:data:`CHEAP_SECONDS` gets a button, a longer one its time and its command.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from .catalog import Catalog
from .errors import WorkbenchError
from .io import atomic_write_json, atomic_write_text

CHEAP_SECONDS = 90.0
DIAGNOSE_TOKENS = 16384  # what `workbench demo` diagnoses a zoo member on
RANK_LANGS = "fra,deu_1996,spa,ita,nld,pol,rus,ell_monotonic,arb,cmn_hans"  # ten languages, five scripts
RANK_UNITS = 10
REMOVAL_STEPS_PER_LN = 2  # `workbench demo`'s removal of the tiny Pre-LN model

# Seconds on 2 CPU cores per 10⁹ parameter·token of work at d_model 128, and a fixed start (loading the
# model; removal also tokenizes its fine-tuning corpus), measured on a tiny zoo member in float32: diagnose
# 7 s, ten languages 3 s, removal 86 s. Wider matrices use the cores better: the rate falls as
# d_model^-1.8 (SmolLM2's measured diagnose, docs/benchmarks.md: 8192 tokens in about 170 s).
RATE = {"diagnose": 0.13, "languages": 0.15, "removal": 0.39}
START = {"diagnose": 1.5, "languages": 1.5, "removal": 15.0}
SMOLLM2 = {"n_params": 134_515_008, "n_layers": 30, "n_ctx": 256, "d_model": 576}  # its working context


@dataclass(frozen=True)
class Job:
    kind: str  # diagnose | languages | removal
    label: str
    spec: str
    out: Path
    seconds: float | None  # None: the model's size cannot be read without loading it

    @property
    def cheap(self) -> bool:
        return self.seconds is not None and self.seconds <= CHEAP_SECONDS

    @property
    def command(self) -> str:
        q = shlex.quote
        if self.kind == "diagnose":
            return f"workbench diagnose {q(self.spec)} --tokens {DIAGNOSE_TOKENS} --out {q(str(self.out))}"
        if self.kind == "languages":
            return (f"workbench rank-languages {q(self.spec)} --langs {RANK_LANGS} --max-units {RANK_UNITS} "
                    f"--out {q(str(self.out))}")
        return f"workbench remove-ln {q(self.spec)} --steps-per-ln {REMOVAL_STEPS_PER_LN} --out {q(str(self.out))}"

    def run(self) -> Path:
        """Compute the result and write it where the command would; returns the path written."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "removal":
            from .removal import remove_ln

            remove_ln(self.spec, self.out, options={"steps_per_ln": REMOVAL_STEPS_PER_LN}, progress=False)
            return self.out
        from .loader import load

        model = load(self.spec, download=False, **({"n_ctx": 1024} if self.kind == "languages" else {}))
        if self.kind == "diagnose":
            from .analysis.depth import diagnose

            atomic_write_json(self.out, diagnose(model, tokens=DIAGNOSE_TOKENS, model_id=self.spec))
            return self.out
        from .languages.figures import ranking_html
        from .languages.ranker import rank_languages

        result = rank_languages(model, "udhr", RANK_LANGS.split(","), max_units=RANK_UNITS, model_name=self.spec)
        result["dtype"] = "float32"
        atomic_write_json(self.out, result)
        atomic_write_text(self.out.with_suffix(".html"), ranking_html(result))
        return self.out


def plan(catalog: Catalog, kind: str, label: str) -> Job:
    """The job that computes ``kind`` for the catalog's model ``label``; refuses (one line) a removal the
    model cannot have."""
    spec = catalog.models[label]
    if kind == "removal":
        check_removable_spec(spec)
    return Job(kind, label, spec, catalog.path_for(kind, label), estimate(kind, spec))


def check_removable_spec(spec: str) -> None:
    """One line for a model whose norms ``remove-ln`` cannot remove, read from its run config alone."""
    cfg = _run_config(spec)
    if cfg is not None:
        from .removal.gpt_sites import check_removable

        check_removable(cfg)


def _run_config(spec: str):
    from .config import ModelConfig

    path = Path(spec) / "config.json"
    try:
        record = json.loads(path.read_text())
        return ModelConfig.from_dict(record["model"])
    except (OSError, ValueError, KeyError, TypeError, WorkbenchError):
        return None


def model_size(spec: str) -> dict | None:
    """n_params, n_layers and n_ctx of a workbench run or SmolLM2, without loading weights."""
    if spec == "smollm2":
        return SMOLLM2
    cfg = _run_config(spec)
    if cfg is None:
        return None
    d, mlp = cfg.d_model, cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    per_block = 4 * d * d + mlp * d
    return {"n_params": cfg.n_layers * per_block + 2 * cfg.d_vocab * d, "n_layers": cfg.n_layers, "n_ctx": cfg.n_ctx,
            "d_model": d}


def estimate(kind: str, spec: str) -> float | None:
    """Expected seconds of ``kind`` on ``spec`` on 2 CPU cores (None: unknown size)."""
    size = model_size(spec)
    if size is None:
        return None
    n, layers, ctx = size["n_params"], size["n_layers"], size["n_ctx"]
    if kind == "diagnose":  # statistics, 2L+1 skip passes on a quarter, 4 backward batches of 8
        tokens = DIAGNOSE_TOKENS * (1 + (2 * layers + 1) / 4) + 3 * 32 * ctx
    elif kind == "languages":  # eleven languages (English too), ten short articles, ~100 tokens each
        tokens = 11 * RANK_UNITS * 100
    else:  # ~3 norms a block + the final one, K steps each and a cool-down, both arms, forward + backward
        tokens = (3 * layers + 2) * REMOVAL_STEPS_PER_LN * 2 * 1024 * 2 * 3
    rate = RATE[kind] * (128 / size["d_model"]) ** 1.8
    return START[kind] + rate * n * tokens / 1e9


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    if seconds < 90:
        return f"about {max(5, round(seconds / 5) * 5):.0f} s"
    if seconds < 5400:
        return f"about {round(seconds / 60):.0f} min"
    return f"about {seconds / 3600:.1f} h"
