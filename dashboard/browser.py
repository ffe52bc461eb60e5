"""Serve the dashboard and load every page at its own address in headless Chromium: what went wrong on
each (an exception, an error or warning box, any dialog such as Streamlit's "page not found"), and a
screenshot. With ``compute``, a page's "Compute now" button is clicked and the page read again.

Used by the end-to-end test and to make the README's screenshots:

    python -m dashboard.browser --results results/demo --out docs/screenshots
    python -m dashboard.browser --results /tmp/fresh --zoo zoo/tiny --compute --out docs/screenshots/zoo-only
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TITLES = {"overview": "Normalization in transformers", "zoo": "Normalization zoo", "depth": "Depth diagnostics",
          "removal": "LayerNorm removal", "attribution": "Direct logit attribution", "norms": "Norms on a prompt",
          "languages": "Language Ranker"}
PATHS = {"overview": ""}  # the main page is "/"; every other page is at /NAME
# Anything a reader should not meet on a page: a traceback, an error or warning box, a dialog (Streamlit's
# "Page not found — running the app's main page" is a dialog over an otherwise normal page).
ERRORS = ('[data-testid="stException"], [data-testid="stAlertContentError"], [data-testid="stAlertContentWarning"], '
          '[data-testid="stDialog"], [role="dialog"]')
COMPUTE = "Compute now"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def serve(results: Path, port: int, zoo: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "WORKBENCH_RESULTS": str(results), **({"WORKBENCH_ZOO": str(zoo)} if zoo else {})}
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited: {proc.stdout.read().decode()[-2000:]}")
    proc.kill()
    raise RuntimeError("streamlit did not answer its health check within 90 s")


def _settle(driver, title: str, timeout: float = 120) -> bool:
    """Wait for the page's title and for the script run to finish (no running indicator for 2 s)."""
    from selenium.webdriver.common.by import By

    deadline, quiet_since, found = time.time() + timeout, None, False
    while time.time() < deadline:
        found = found or any(title in h.text for h in driver.find_elements(By.CSS_SELECTOR, "h1"))
        running = driver.execute_script(
            "return !!document.querySelector('[data-testid=\"stStatusWidget\"] img, "
            "[data-testid=\"stStatusWidgetRunningIcon\"], [data-testid=\"stSpinner\"]')")
        if found and not running:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since > 2:
                return True
        else:
            quiet_since = None
        time.sleep(0.25)
    return found


def _errors(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    found = [(e.text or e.get_attribute("data-testid") or "dialog")[:300]
             for e in driver.find_elements(By.CSS_SELECTOR, ERRORS)]
    return list(dict.fromkeys(found))  # a dialog matches twice (its frame and its section)


def _compute_button(driver):
    from selenium.webdriver.common.by import By

    return next((b for b in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stButton"] button')
                 if b.text.startswith(COMPUTE)), None)


def _visit(driver, url: str, title: str, compute: bool) -> dict:
    """One page: its title and error elements; with ``compute``, its Compute button clicked, then the page
    opened afresh (a second visit: it must read what was written, and offer nothing more)."""
    driver.get(url)
    report = {"title_found": _settle(driver, title), "errors": _errors(driver), "computed": False}
    button = _compute_button(driver)
    if compute and button is not None:
        button.click()
        time.sleep(1)  # the click's rerun starts before the page counts as settled
        _settle(driver, title, timeout=600)
        report["errors"] += _errors(driver)
        driver.get(url)
        report["title_found"] = _settle(driver, title) and report["title_found"]
        report.update(computed=True, errors=report["errors"] + _errors(driver))
    report["offers"] = int(_compute_button(driver) is not None)
    return report


def screenshot_pages(results: Path, out: Path, pages: list[str], chromium: str, chromedriver: str, port: int,
                     profile: Path, width: int = 1400, height: int = 1800, model: str | None = None,
                     zoo: Path | None = None, compute: bool = False,
                     visits: list[tuple[str, str, str]] = ()) -> dict[str, dict]:
    """Load every page at its own address (and, with ``model``, the pages that take one — Attribution,
    Depth, Norms — opened on it through ``?model=SPEC``, reported as ``NAME?model``; ``visits``: more
    (key, page, spec) to open the same way); screenshot each; report
    ``title_found``, ``errors`` (see ERRORS), ``computed`` (its Compute button was clicked: ``compute``)
    and ``offers`` (a Compute button is still there)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out.mkdir(parents=True, exist_ok=True)
    server = serve(results, port, zoo)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    report = {}
    try:
        opened = [(name, name, "") for name in pages]
        if model is not None:
            opened += [(f"{name}?model", name, model) for name in ("attribution", "depth", "norms") if name in pages]
        opened += list(visits)
        for key, name, spec in opened:
            query = "?" + urllib.parse.urlencode({"model": spec}) if spec else ""
            url = f"http://127.0.0.1:{port}/{PATHS.get(name, name)}{query}"
            report[key] = _visit(driver, url, TITLES[name], compute)
            driver.save_screenshot(str(out / f"{key.replace('?', '-')}.png"))
    finally:
        driver.quit()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    return report


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default="results/demo")
    p.add_argument("--out", default="docs/screenshots")
    p.add_argument("--pages", default=",".join(TITLES))
    p.add_argument("--zoo", help="the zoo directory (default: the manifest's, else zoo/tiny)")
    p.add_argument("--compute", action="store_true", help="click every page's Compute button (writes into --results)")
    a = p.parse_args()
    exe, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (exe and driver):
        print("needs chromium and chromedriver (apt install chromium chromium-driver)", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as profile:
        report = screenshot_pages(Path(a.results), Path(a.out), a.pages.split(","), exe, driver, port, Path(profile),
                                  zoo=Path(a.zoo) if a.zoo else None, compute=a.compute)
    for name, r in report.items():
        print(f"{name}: {'ok' if r['title_found'] and not r['errors'] else r}")
    return 0 if all(r["title_found"] and not r["errors"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
