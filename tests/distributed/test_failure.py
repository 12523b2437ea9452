"""A rank that raises makes the others stop with its error, quickly, instead of hanging; a rank
that hangs makes them fail at the collective timeout, and the launcher kills it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

import fprecond.distributed as fpd
from tests.distributed import workers

COLLECTIVE_TIMEOUT = 60.0


def test_a_failing_rank_stops_the_others_with_its_error_well_before_the_timeout():
    start = time.monotonic()
    with pytest.raises(fpd.LaunchError) as caught:
        fpd.launch(workers.fail_on_rank_one, 2, timeout=120.0, collective_timeout=COLLECTIVE_TIMEOUT)
    elapsed = time.monotonic() - start
    error = caught.value
    first_line = str(error).splitlines()[0]
    assert first_line == "rank 1 failed: ValueError: boom on purpose"  # the cause first
    assert set(error.errors) == {0, 1} and not error.timed_out
    echo = error.errors[0]
    assert echo.startswith("PeerFailure: all_reduce_mean on rank 0 of 2 stopped: rank 1 failed with ValueError: "
                           "boom on purpose")
    waited = float(re.search(r"after ([0-9.]+) s", echo).group(1))
    # Rank 0 learnt of the failure from the closed connection and the store, not from the
    # collective's timeout (60 s).
    assert waited < 10.0
    assert elapsed < 120.0


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # reaped in between
        return False


HANG_TIMEOUT = 2.0


def test_a_hanging_rank_makes_the_others_fail_at_the_collective_timeout_and_is_killed(tmp_path):
    start = time.monotonic()
    with pytest.raises(fpd.LaunchError) as caught:
        fpd.launch(workers.hang_on_rank_one, 2, args=(str(tmp_path),), timeout=60.0,
                   collective_timeout=HANG_TIMEOUT)
    elapsed = time.monotonic() - start
    error = caught.value
    assert set(error.errors) == {0} and error.hung == (1,) and not error.timed_out
    echo = error.errors[0]
    assert re.match(r"PeerFailure: all_reduce_mean on rank 0 of 2 timed out after [0-9.]+ s \(the process group's "
                    rf"timeout is {HANG_TIMEOUT:g} s\) and no rank reported an error: another rank is hung", echo)
    waited = float(re.search(r"\(after ([0-9.]+) s\)", echo).group(1))
    assert HANG_TIMEOUT <= waited < HANG_TIMEOUT + 1.5  # the timeout, not the 2 s wait for a report on top
    lines = str(error).splitlines()
    assert lines[0].startswith("rank 0 failed: PeerFailure: all_reduce_mean on rank 0 of 2 timed out")
    assert lines[1].startswith("ranks [1] were still running 2.5 s after the first failure") and "hung" in lines[1]
    # Killed 2.5 s after rank 0 failed, not at the launch's 60 s deadline.
    assert elapsed < 30.0
    pids = [int((tmp_path / f"pid-{rank}").read_text()) for rank in range(2)]
    deadline = time.monotonic() + 5.0
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a launched process outlived launch()"
