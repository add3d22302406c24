"""How a run stands: the steps it completed (analysis.summary.step_counts) and whether its
capture is still being written (trace.meta.run_status, layout.shown_status)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from profiler.analysis.summary import median_step_time_us, step_counts
from profiler.trace import layout, schema
from profiler.trace.meta import DIED, RUNNING, RUNNING_ELSEWHERE, run_status
from profiler.trace.model import Trace

HOST = socket.gethostname()


def _trace(meta: dict, step_rows: list[int], event_steps: list[int]) -> Trace:
    tables = {t: schema.empty_table(t).to_pandas() for t in schema.TABLE_NAMES}
    tables["steps"] = pd.DataFrame({"step": step_rows, "ts_us": [1_000 * (s + 1) ** 2 for s in step_rows]})
    tables["events"] = pd.DataFrame({"step": event_steps})
    return Trace(path=Path("run"), meta=meta, **tables)


# -- steps ------------------------------------------------------------------------------------


def test_a_finished_capture_counts_its_optimizer_steps_and_marks_the_tail():
    # Three boundaries (rows 0-2), then the row the capture writes for the events after them.
    trace = _trace({"status": "complete", "steps_completed": 3}, [0, 1, 2, 3], [0, 0, 1, 2, 3])
    assert step_counts(trace) == (3, True)
    # Step times are between the completed steps' ends: (4000 - 1000, 9000 - 4000), not the tail's 16000.
    assert median_step_time_us(trace, 3) == 4_000.0
    no_tail = _trace({"status": "complete", "steps_completed": 3}, [0, 1, 2], [0, 1, 2])
    assert step_counts(no_tail) == (3, False)


def test_a_capture_that_never_stepped_has_no_completed_step():
    assert step_counts(_trace({"status": "complete", "steps_completed": 0}, [0], [0, 0])) == (0, True)


def test_a_live_or_killed_capture_counts_every_row_and_the_step_in_progress():
    # meta's count lags (written at the last drain); every row written so far is a boundary.
    trace = _trace({"steps_completed": 1}, [0, 1], [0, 1, 2])
    assert step_counts(trace) == (2, True)
    assert step_counts(_trace({}, [], [0, 0])) == (0, True)  # killed before its first boundary


def test_a_trace_without_steps_or_their_count_counts_its_events_steps():
    assert step_counts(_trace({"status": "complete"}, [], [0, 1, 1, -1])) == (2, False)
    assert step_counts(_trace({"status": "complete"}, [0, 1], [0, 1])) == (2, False)  # an older trace


# -- whether the capture still runs -------------------------------------------------------------


def _meta(pid: int, host: str = HOST, **kw) -> dict:
    return dict(pid=pid, hostname=host, started_at=time.time(), **kw)


def test_a_final_status_is_shown_as_written():
    assert run_status(_meta(os.getpid(), status="oom")) == "oom"
    assert run_status({"status": "complete"}) == "complete"


def test_a_live_process_is_running_and_an_ended_one_died():
    assert run_status(_meta(os.getpid())) == RUNNING
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert run_status(_meta(child.pid)) == DIED


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told from /proc")
def test_a_killed_process_not_yet_reaped_died():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        meta = _meta(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while run_status(meta) != DIED and time.monotonic() < deadline:  # signal delivery is asynchronous
            time.sleep(0.05)
        assert run_status(meta) == DIED  # a zombie: signal 0 still reaches it
    finally:
        child.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times are read from /proc")
def test_a_pid_taken_by_a_later_process_died():
    # This process started after a capture that began a day ago: the capture's process is gone.
    assert run_status(_meta(os.getpid()) | {"started_at": time.time() - 86_400}) == DIED


def test_another_host_or_no_pid_cannot_be_checked():
    assert run_status(_meta(os.getpid(), host=HOST + "-elsewhere")) == RUNNING_ELSEWHERE
    assert run_status({"hostname": HOST}) == RUNNING_ELSEWHERE
    assert run_status(None) == RUNNING_ELSEWHERE


def _rank(job: Path, rank: int, meta: dict) -> None:
    (job / f"rank={rank}").mkdir(parents=True)
    (job / f"rank={rank}" / schema.META_FILE).write_text(json.dumps(meta))


def test_a_job_died_once_a_rank_died(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    job = tmp_path / "job"
    _rank(job, 0, _meta(os.getpid()))
    _rank(job, 1, _meta(ended.pid))
    assert layout.shown_status(job, "running") == DIED
    assert layout.shown_status(job / "rank=0", "running") == RUNNING
    assert layout.shown_status(job, "incomplete") == "incomplete"  # a status the ranks settled is kept
    live = tmp_path / "live"
    _rank(live, 0, _meta(os.getpid()))
    _rank(live, 1, _meta(os.getpid(), host=HOST + "-elsewhere"))
    assert layout.shown_status(live, "running") == RUNNING


def test_the_report_says_what_went_wrong_under_the_status():
    from profiler.report_state import state_lines, steps_text

    oom = dict(device=0, requested_bytes=2 << 30, device_allocated_bytes=78 << 30, device_free_bytes=512 << 20, step=4)
    run = dict(status="oom", steps=4, tail_step=True, error="OutOfMemoryError: CUDA out of memory.", oom=oom)
    assert steps_text(run) == "4 (+ tail)"
    assert state_lines(run) == [
        "  error: OutOfMemoryError: CUDA out of memory.",
        "  out of memory: 2.00 GiB requested on device 0 at step 4, with 78.00 GiB allocated and 512.00 MiB free",
    ]
    assert steps_text(dict(status=DIED, steps=2, tail_step=True)) == "2 (+ 1 unfinished)"
    assert state_lines(dict(status="complete", steps=1, tail_step=False)) == []
