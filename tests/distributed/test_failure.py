"""A rank that raises makes the others stop with its error, quickly, instead of hanging."""

from __future__ import annotations

import re
import time

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
