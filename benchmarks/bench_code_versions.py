"""Wall time of the same workbench commands with two versions of the code, side by side in one run.

    python benchmarks/bench_code_versions.py --before DIR [--repeats 3] [--out FILE.json]

``DIR`` is a checkout of the commit before a change (``git worktree add /tmp/before <commit>``). Each
command runs in a fresh process with ``PYTHONPATH`` set to the before checkout or to this one, interleaved
(before, after, before, after, …) so drift in machine load hits both alike; the table gives the median
seconds of each and the ratio after / before. The commands are what a refactor of the training loops
must not slow down: pre-training (``train``, the loop ``make zoo`` runs per norm), the in-process training
throughput benchmark, and a LayerNorm removal with its control.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def commands(scratch: Path) -> dict[str, list[str]]:
    wb = [sys.executable, "-m", "workbench.cli"]
    return {
        "train tiny pre-ln, 150 steps": wb + ["train", "--norm", "pre-ln", "--preset", "tiny", "--steps", "150",
                                              "--dtype", "float32", "--out", str(scratch / "train"), "--quiet"],
        "bench_train_throughput (bench, float32)": [sys.executable, str(HERE / "benchmarks/bench_train_throughput.py"),
                                                   "--steps", "5", "--repeats", "2", "--no-tl", "--dtypes", "float32"],
        "remove-ln tiny pre-ln (+ control)": wb + ["remove-ln", str(scratch / "src"), "--out", str(scratch / "free"),
                                                   "--dtype", "float32", "--checkpoint-every", "0", "--quiet"],
    }


def run(cmd: list[str], code: Path, scratch: Path) -> float:
    for d in ("train", "free"):
        subprocess.run(["rm", "-rf", str(scratch / d)], check=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_versions_"))
    # the removal's source model, trained once with the *before* code: the newer code reads older run
    # directories, not the other way round
    subprocess.run([sys.executable, "-m", "workbench.cli", "train", "--norm", "pre-ln", "--preset", "tiny", "--steps",
                    "100", "--out", str(scratch / "src"), "--quiet"], cwd=a.before, check=True,
                   env={**os.environ, "PYTHONPATH": str(a.before.resolve())}, stdout=subprocess.DEVNULL)
    times: dict[str, dict[str, list[float]]] = {}
    for _ in range(a.repeats):
        for name, cmd in commands(scratch).items():
            for label, code in (("before", a.before.resolve()), ("after", HERE)):
                times.setdefault(name, {}).setdefault(label, []).append(run(cmd, code, scratch))
    rows = []
    print(f"{'command':<42}{'before s':>10}{'after s':>10}{'after/before':>14}")
    for name, t in times.items():
        b, af = statistics.median(t["before"]), statistics.median(t["after"])
        rows.append({"command": name, "before_s": b, "after_s": af, "ratio": af / b, "runs": t})
        print(f"{name:<42}{b:>10.2f}{af:>10.2f}{af / b:>14.3f}")
    if a.out:
        a.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                     "repeats": a.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
