"""A result that is missing: a button that computes it now (a progress bar, the file written into the
results directory as the CLI writes it), or — when it would take long — its time and its command."""

from __future__ import annotations

import threading
import time

import streamlit as st

from workbench.errors import WorkbenchError
from workbench.live import Job, duration

# What a job can fail with besides a WorkbenchError: a model file that does not read, a full disk.
FAILURES = (WorkbenchError, OSError, ValueError, RuntimeError)


def offer(jobs: list[Job], what: str, key: str) -> bool:
    """Offer to compute ``jobs`` (one result each); True once they have been computed in this run.

    Every job cheap: an info line and a button. Otherwise the time and the commands, and no button: a
    page must not start half an hour of work on a click."""
    if not jobs:
        return False
    total = sum(j.seconds or 0 for j in jobs)
    if all(j.cheap for j in jobs):
        more = f" (and {len(jobs) - 1} more like it)" if len(jobs) > 1 else ""
        st.info(f"{what}: not computed yet, {duration(total)} on 2 CPU cores. The button writes what "
                f"`{jobs[0].command}`{more} writes.")
        if st.button(f"Compute now ({duration(total)})", key=key, type="primary"):
            return run(jobs)
        return False
    commands = "\n".join(j.command for j in jobs)
    unknown = any(j.seconds is None for j in jobs)
    st.info(f"{what}: not computed yet, " + ("its time depends on the model" if unknown else duration(total))
            + f" on 2 CPU cores, too long for this page. Compute it with:\n\n```\n{commands}\n```")
    return False


def run(jobs: list[Job]) -> bool:
    """Run ``jobs`` one after the other under one progress bar (each job's share from its time estimate);
    a failure is one line on the page. Returns whether every job finished."""
    total = sum(j.seconds or 1 for j in jobs)
    bar = st.progress(0.0, text="starting…")
    done = 0.0
    for i, job in enumerate(jobs, 1):
        label = f"{job.kind} of {job.label} ({i}/{len(jobs)})"
        try:
            _one(job, lambda f: bar.progress(min(1.0, (done + f * (job.seconds or 1)) / total), text=label))
        except FAILURES as e:
            bar.empty()
            st.error(f"{job.label}: {' '.join(str(e).split())}")
            return False
        done += job.seconds or 1
    bar.progress(1.0, text=f"done: {len(jobs)} result{'s' * (len(jobs) > 1)} written to `{jobs[0].out.parent}`")
    return True


def _one(job: Job, show) -> None:
    """The job in a worker thread; the page's own thread moves the bar along the job's expected time (the
    analyses report no progress of their own), never past 95 % before the job ends."""
    failure: list[BaseException] = []

    def work():
        try:
            job.run()
        except BaseException as e:  # noqa: BLE001 — handed to the page's thread, which decides
            failure.append(e)

    worker = threading.Thread(target=work, daemon=True)
    t0 = time.perf_counter()
    worker.start()
    while worker.is_alive():
        show(min(0.95, (time.perf_counter() - t0) / max(job.seconds or 1, 1)))
        worker.join(0.25)
    if failure:
        raise failure[0]
    show(1.0)
