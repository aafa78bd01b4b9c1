"""Test-suite policy.

* ``gpu`` tests need CUDA; they are the only tests allowed to skip.
* In CI (``CI=true``) any other skip is turned into a failure, so a missing
  dependency (Redis, vLLM, the extension) can never pass as a skip.
* ``slow`` marks multi-process / end-to-end tests (all still run in CI).
"""

import os
import uuid

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: long multi-process or end-to-end test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and "gpu" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every non-GPU test: {report.longrepr}"


@pytest.fixture
def region_path():
    """A fresh shared-region path in /dev/shm, removed after the test."""
    path = f"/dev/shm/stratacache-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.region"
    yield path
    if os.path.exists(path):
        os.unlink(path)
