"""How long each dashboard page takes to render from stored results, measured with Streamlit's AppTest
(the script run, without a browser): the imports a server pays once (torch, plotly, streamlit,
workbench), the first render in a fresh process after them (model loads, cold caches), and the
median of the next renders (st.cache_data / st.cache_resource warm, as for a user who
opens a page a second time or changes a widget).

    python benchmarks/bench_dashboard.py [--results results/demo] [--repeats 5] [--out FILE.json]

Each page is timed in its own process so that one page's imports do not warm another's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["zoo", "depth", "removal", "attribution", "languages"]


def time_page(name: str, repeats: int) -> dict:
    t0 = time.perf_counter()
    # What a running server has imported once for all pages and sessions: measured apart.
    import plotly.graph_objects  # noqa: F401
    import torch  # noqa: F401
    from streamlit.testing.v1 import AppTest

    import workbench.analysis.dla  # noqa: F401
    import workbench.languages  # noqa: F401
    imports = time.perf_counter() - t0
    sys.path.insert(0, str(ROOT))
    times = []
    for _ in range(repeats + 1):
        at = AppTest.from_file(str(ROOT / "dashboard" / f"{name}.py"), default_timeout=600)
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
        if at.exception:
            raise SystemExit(f"{name}: {at.exception[0].message}")
    return {"imports_s": round(imports, 3), "first_s": round(times[0], 3), "warm_median_s": round(statistics.median(times[1:]), 3),
            "warm_max_s": round(max(times[1:]), 3)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default="results/demo")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--page", help=argparse.SUPPRESS)  # internal: time one page in this process
    p.add_argument("--out")
    a = p.parse_args()
    os.environ["WORKBENCH_RESULTS"] = a.results
    if a.page:
        print(json.dumps(time_page(a.page, a.repeats)))
        return 0
    rows = {}
    for name in PAGES:
        r = subprocess.run([sys.executable, __file__, "--results", a.results, "--repeats", str(a.repeats), "--page", name],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
            return 1
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name:<12} imports {rows[name]['imports_s']:5.2f} s   first {rows[name]['first_s']:6.2f} s   warm median {rows[name]['warm_median_s']:6.3f} s"
              f"   warm max {rows[name]['warm_max_s']:6.3f} s")
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
           "results": a.results, "repeats": a.repeats, "pages": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
