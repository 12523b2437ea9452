"""Fixtures shared by the whole suite. Numerical tests run in float64."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import CASES, LOSSES

torch.set_default_dtype(torch.float64)
# One thread: the suite's matrices are tiny, and thread start-up dominates on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case_name(request) -> str:
    return request.param


@pytest.fixture(params=list(LOSSES), ids=[f"{a}-{b}" for a, b in LOSSES])
def loss_key(request) -> tuple[str, str]:
    return request.param


# A run in which every test was skipped or deselected must not pass CI silently.
_PASSED = {"count": 0}


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" and report.passed:
        _PASSED["count"] += 1


def pytest_sessionfinish(session, exitstatus) -> None:
    if exitstatus == 0 and _PASSED["count"] == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
