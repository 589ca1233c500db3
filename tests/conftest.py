"""Shared test fixtures: the read-only reference folder beside the project."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference folder {REFERENCE} is absent (it sits beside the project checkout)")
    return REFERENCE


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`), each worker computes on one thread, and so do the
    commands it starts: two workers on a 2-core machine then fill it without
    oversubscribing it. A test that sets its own thread count still does."""
    import os
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
