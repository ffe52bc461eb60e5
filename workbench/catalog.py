"""What exists to look at: the models of a zoo and of a results manifest, and every result stored for them.

One discovery for every reader (the dashboard's pages, notebooks): a zoo directory (``workbench zoo``) and a
results directory (``workbench demo``'s ``manifest.json``, plus what the dashboard computed there itself) are
read into one :class:`Catalog`. Nothing is loaded or written here; a manifest that cannot be read is
reported in ``problems`` rather than raised, so a reader can still show the zoo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .demo import read_manifest
from .errors import WorkbenchError
from .studies import DIAGNOSE_FILE  # what `workbench demo` / `compare` cache beside a zoo member
from .zoo import run_dirs

DEFAULT_ZOO = "zoo/tiny"
# kind → (folder under the results directory, the manifest's key, suffix of one result)
KINDS = {"diagnose": ("diagnostics", "diagnostics", ".json"), "languages": ("languages", "languages", ".json"),
         "removal": ("ln_free", "removal", "")}


@dataclass
class Catalog:
    results: Path
    zoo: Path
    models: dict[str, str] = field(default_factory=dict)  # label → model spec (zoo members first)
    found: dict[str, dict[str, Path]] = field(default_factory=lambda: {k: {} for k in KINDS})  # kind → label → path
    slugs: dict[str, str] = field(default_factory=dict)  # label → file name of the results computed for it
    manifest: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def result(self, kind: str, label: str) -> Path | None:
        return self.found[kind].get(label)

    def path_for(self, kind: str, label: str) -> Path:
        """Where a result of ``kind`` for ``label`` is written: the results directory, as the CLI would."""
        folder, _, suffix = KINDS[kind]
        return self.results / folder / f"{self.slugs.get(label) or slug(label)}{suffix}"

    def zoo_labels(self) -> list[str]:
        return [label for label, spec in self.models.items() if _inside(spec, self.zoo)]

    def local_labels(self) -> list[str]:
        """The models trained here: the zoo's members and the LN-free models in the results directory."""
        return [label for label, spec in self.models.items() if _inside(spec, self.zoo) or _inside(spec, self.results)]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _inside(spec: str, folder: Path) -> bool:
    try:
        Path(spec).resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def discover(results: str | Path, zoo: str | Path | None = None) -> Catalog:
    """The models of ``zoo`` (default: the manifest's zoo, else ``zoo/tiny``) and of ``results``' manifest,
    and every result for them: the manifest's, a zoo member's cached ``diagnose.json``, and the files the
    dashboard wrote under ``results`` (named by :meth:`Catalog.path_for`)."""
    results = Path(results)
    manifest, problems = {}, []
    try:
        manifest = read_manifest(results) or {}
    except WorkbenchError as e:
        problems.append(str(e))
    cat = Catalog(results, Path(zoo or manifest.get("zoo") or DEFAULT_ZOO), manifest=manifest, problems=problems)
    members = {}
    try:
        members = run_dirs(cat.zoo)
    except WorkbenchError as e:  # a member's summary.json is damaged
        problems.append(str(e))
    for label, run in members.items():
        cat.models[label] = str(run)
        cat.slugs[label] = slug(f"{cat.zoo.name}-{label}")  # two zoos' pre-ln must not share a file
        if (run / DIAGNOSE_FILE).is_file():
            cat.found["diagnose"][label] = run / DIAGNOSE_FILE
    _add_manifest(cat, manifest)
    _add_computed(cat, "removal")
    for label, run in list(cat.found["removal"].items()):  # a finished removal is a model of its own
        if not any(_same(s, str(run)) for s in cat.models.values()):
            cat.models[f"{label} LN-free"] = str(run)
            cat.slugs[f"{label} LN-free"] = slug(f"{cat.slugs.get(label, label)}-ln-free")
    for kind in ("diagnose", "languages"):
        _add_computed(cat, kind)
    return cat


def _add_computed(cat: Catalog, kind: str) -> None:
    for label in cat.models:
        path = cat.path_for(kind, label)
        if label not in cat.found[kind] and _finished(kind, path):
            cat.found[kind][label] = path


def _add_manifest(cat: Catalog, manifest: dict) -> None:
    """The manifest's models under their own labels, unless the zoo already holds the same model; a label
    the zoo uses for another model gets the manifest's zoo name added."""
    rename: dict[str, str] = {}
    for label, spec in (manifest.get("models") or {}).items():
        same = next((lb for lb, s in cat.models.items() if _same(s, str(spec))), None)
        if same is None:
            same = label if label not in cat.models else f"{label} ({Path(manifest.get('zoo') or 'demo').name})"
            cat.models[same] = str(spec)
        rename[label] = same
    for kind, (_, key, _) in KINDS.items():
        for label, path in (manifest.get(key) or {}).items():
            target = rename.get(label, label)
            if _finished(kind, Path(path)):
                cat.found[kind].setdefault(target, Path(path))


def _finished(kind: str, path: Path) -> bool:
    return (path / "summary.json").is_file() if kind == "removal" else path.is_file()


def read_result(path: str | Path) -> dict:
    """A stored JSON result, or one line saying why it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"{path} cannot be read ({e.__class__.__name__}); delete it and compute it again") from None
