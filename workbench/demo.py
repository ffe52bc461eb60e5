"""``workbench demo``: the whole story on the bundled corpus, and the results the dashboard reads.

Trains the tiny zoo if it is not there, and the 12-layer ``small`` members of the depth story (pre-ln,
lns, mix-ln, post-ln; two blocks show no depth effect), computes every analysis that exists — depth
diagnostics of every model, LayerNorm removal of the Pre-LN model (with its control), direct logit attribution of the
bundled prompts before and after removal, the Language Ranker on the UDHR for every Pre-norm model, and
SmolLM2's depth diagnostics and Language Ranker when ``workbench fetch smollm2`` has cached it —
and writes ``RESULTS/manifest.json`` naming where each result lives. Finished steps are kept, so a
second run only does what is missing. The dashboard reads the manifest (``streamlit run app.py --
--results RESULTS``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import WorkbenchError
from .io import atomic_write_json, atomic_write_text

MANIFEST = "manifest.json"
DEFAULT_RESULTS = "results/demo"
RANKED_NORMS = ("pre-ln", "pre-rms", "lns", "none")  # attributed and ranked: Pre-norm family + a norm-free baseline


@dataclass
class DemoConfig:
    zoo: str = "zoo/tiny"
    results: str = DEFAULT_RESULTS
    preset: str = "tiny"
    norms: str | None = None  # zoo members (default: every registered norm)
    corpus: str = "english"
    diagnose_tokens: int = 16384
    removal_norm: str = "pre-ln"
    removal_steps_per_ln: int = 2
    rank_max_units: int = 10
    rank_langs: str | None = None  # comma-separated UDHR codes (default: every declaration)
    smollm2: bool = True  # also diagnose and rank SmolLM2 when `workbench fetch smollm2` has cached it
    smollm2_tokens: int = 4096
    smollm2_every: int = 4  # every 4th UDHR declaration (127 languages), bfloat16
    steps: int | None = None  # training steps (default: the preset's)
    # The depth story needs depth: these members of the 12-layer preset, trained (or reused) in depth_zoo.
    depth_zoo: str = "zoo/small"
    depth_norms: str | None = "pre-ln,lns,mix-ln,post-ln"  # None or "": skip
    depth_preset: str = "small"
    depth_steps: int | None = None
    depth_seeds: str | None = None  # e.g. "0,1,2": the depth members with seeds, and intervals on the Depth page
    depth_model_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # training precision (workbench.precision): bfloat16 where the CPU/GPU has it natively
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)


def dashboard_command(results: str | Path) -> str:
    return f"streamlit run app.py -- --results {results}"


def read_manifest(results: str | Path) -> dict[str, Any] | None:
    path = Path(results) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise WorkbenchError(f"{path} is not valid JSON; delete it and run `workbench demo` again") from None


def run_demo(cfg: DemoConfig = DemoConfig(), progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Every step of the demo; returns the manifest."""
    from .loader import smollm2_cached

    zoo, out = _prepare_dirs(cfg)
    t0 = time.perf_counter()
    finished, depth_zoo = _train_and_diagnose(cfg, zoo, progress, log)
    removal = _remove_layernorm(cfg, zoo, out, finished, progress, log)
    smollm2_ready = cfg.smollm2 and smollm2_cached()
    diagnostics = _diagnose_smollm2(cfg, out, log) if smollm2_ready else {}
    attribution = _attribute(cfg, zoo, out, finished, removal, smollm2_ready, log)
    languages = _rank_zoo_languages(cfg, zoo, out, finished, removal, log)
    if smollm2_ready:
        languages["smollm2"] = _rank_smollm2_languages(cfg, out, log)

    manifest = {"zoo": str(zoo), "depth_zoo": str(depth_zoo) if depth_zoo else None, "removal": removal, "diagnostics": diagnostics, "attribution": str(attribution), "languages": languages,
                "models": {**{n: str(zoo / n) for n in finished}, **{f"{n} LN-free": p for n, p in removal.items()},
                           **({"smollm2": "smollm2"} if smollm2_ready else {})},
                "config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _prepare_dirs(cfg: DemoConfig) -> tuple[Path, Path]:
    """Refuse a bad preset or a directory argument that is a file before any work; create the results folder."""
    from .presets import get_preset

    zoo, out = Path(cfg.zoo), Path(cfg.results)
    get_preset(cfg.preset)
    for path, flag in ((zoo, "--zoo"), (out, "--results"), (Path(cfg.depth_zoo), "--depth-zoo")):
        if path.exists() and not path.is_dir():
            raise WorkbenchError(f"{flag} {path} exists and is not a directory; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    return zoo, out


def _train_and_diagnose(cfg: DemoConfig, zoo: Path, progress: bool,
                        log: Callable[[str], None]) -> tuple[dict[str, dict], Path | None]:
    """Steps 1-2: train (or reuse) the zoo and the depth-story members, with their depth diagnostics.
    Returns the zoo members that finished without diverging, and the depth zoo (None when skipped)."""
    from .studies import zoo_diagnostics
    from .zoo import collect_existing, train_zoo

    log(f"[1/5] zoo in {zoo}")
    train_zoo(zoo, preset=cfg.preset, norms=cfg.norms, steps=cfg.steps, corpus=cfg.corpus, progress=progress, log=log,
              model_overrides=cfg.model_overrides or None, train_overrides=cfg.train_overrides or None, dtype=cfg.dtype)
    finished = {n: r for n, r in collect_existing(zoo).items() if not r.get("diverged")}

    log("[2/5] depth diagnostics of every model (cached as <run>/diagnose.json)")
    zoo_diagnostics(zoo, tokens=cfg.diagnose_tokens)
    depth_zoo = None
    if cfg.depth_norms:
        depth_zoo = Path(cfg.depth_zoo)
        log(f"      the depth story on {cfg.depth_preset} models ({cfg.depth_norms}) in {depth_zoo}")
        train_zoo(depth_zoo, preset=cfg.depth_preset, norms=cfg.depth_norms, steps=cfg.depth_steps, corpus=cfg.corpus,
                  progress=progress, log=log, dtype=cfg.dtype, seeds=cfg.depth_seeds,
                  model_overrides=cfg.depth_model_overrides or None, train_overrides=cfg.train_overrides or None)
        zoo_diagnostics(depth_zoo, tokens=cfg.diagnose_tokens)
    return finished, depth_zoo


def _remove_layernorm(cfg: DemoConfig, zoo: Path, out: Path, finished: dict[str, dict], progress: bool,
                      log: Callable[[str], None]) -> dict[str, str]:
    """Step 3: the LN-free version of the removal norm's model, if that model trained; {norm: its directory}."""
    from .removal import RemovalConfig, remove_ln

    removal: dict[str, str] = {}
    if cfg.removal_norm in finished:
        ln_free = out / "ln_free" / cfg.removal_norm
        log(f"[3/5] LayerNorm removal of {cfg.removal_norm} → {ln_free}")
        if not (ln_free / "summary.json").is_file():
            remove_ln(zoo / cfg.removal_norm, ln_free, RemovalConfig.of(steps_per_ln=cfg.removal_steps_per_ln),
                      progress=progress)
        removal[cfg.removal_norm] = str(ln_free)
    else:
        log(f"[3/5] skipped: no trained {cfg.removal_norm} model in {zoo}")
    return removal


def _diagnose_smollm2(cfg: DemoConfig, out: Path, log: Callable[[str], None]) -> dict[str, str]:
    """SmolLM2's depth diagnostics beside the zoo's (called only when it is cached); {"smollm2": file}."""
    from .analysis.depth import diagnose
    from .loader import load

    path = out / "diagnose_smollm2.json"
    log(f"      SmolLM2 is cached: its depth diagnostics too → {path}")
    if not path.is_file():
        atomic_write_json(path, diagnose(load("smollm2"), corpus=cfg.corpus, tokens=cfg.smollm2_tokens,
                                         model_id="smollm2"))
    return {"smollm2": str(path)}


def _attribute(cfg: DemoConfig, zoo: Path, out: Path, finished: dict[str, dict], removal: dict[str, str],
               smollm2_ready: bool, log: Callable[[str], None]) -> Path:
    """Step 4: direct logit attribution of the bundled prompts for every attributed model; the CSV written."""
    from .analysis.report import attribution_report
    from .loader import load

    log("[4/5] direct logit attribution of the bundled prompts, before and after removal")
    models = {n: str(zoo / n) for n in finished if n in RANKED_NORMS}
    models.update({f"{n} LN-free": p for n, p in removal.items()})
    if smollm2_ready:  # a pretrained model beside the zoo, through the same surface
        models["smollm2"] = "smollm2"
    attribution = out / "attribution.csv"
    table = attribution_report({label: load(p) for label, p in models.items()}, corpus=cfg.corpus)
    atomic_write_text(attribution, table.to_csv(index=False))
    return attribution


def _rank_zoo_languages(cfg: DemoConfig, zoo: Path, out: Path, finished: dict[str, dict], removal: dict[str, str],
                        log: Callable[[str], None]) -> dict[str, str]:
    """Step 5: the Language Ranker on the UDHR for every ranked zoo member and LN-free model; {name: file}."""
    from .languages.ranker import rank_languages

    log("[5/5] Language Ranker on the UDHR")
    languages: dict[str, str] = {}
    (out / "languages").mkdir(exist_ok=True)
    for name in [n for n in RANKED_NORMS if n in finished] + [f"{n} LN-free" for n in removal]:
        path = out / "languages" / f"{name.replace(' ', '_')}.json"
        if not path.is_file():
            spec = removal[name.split()[0]] if name.endswith("LN-free") else zoo / name
            langs = cfg.rank_langs.split(",") if cfg.rank_langs else None
            r = rank_languages(spec, "udhr", langs, max_units=cfg.rank_max_units, model_name=name)
            atomic_write_json(path, r)
        languages[name] = str(path)
    return languages


def _rank_smollm2_languages(cfg: DemoConfig, out: Path, log: Callable[[str], None]) -> str:
    """SmolLM2's Language Ranker on every ``smollm2_every``-th declaration, in bfloat16; the file written."""
    from .languages.ranker import rank_languages
    from .loader import load

    path = out / "languages" / "smollm2.json"
    log(f"      SmolLM2: every {cfg.smollm2_every}th declaration, bfloat16 → {path}")
    if not path.is_file():
        import torch

        from .languages.parallel import load_parallel

        model = load("smollm2", n_ctx=1024).to(torch.bfloat16)
        pc = load_parallel("udhr")
        codes = [lang.code for lang in pc.resolve(None, "article")][:: cfg.smollm2_every]
        r = rank_languages(model, pc, codes, max_units=cfg.rank_max_units, model_name="smollm2 (bfloat16)")
        atomic_write_json(path, r)
    return str(path)
