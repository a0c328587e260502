"""Shared fixtures. One local Ray instance serves the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors"
LOCAL_VECTORS = Path(__file__).resolve().parent / "data" / "testvectors"


@pytest.fixture(scope="session")
def testvectors_dir() -> Path:
    """The project's copy of the independent test vectors (shared/testvectors)."""
    return LOCAL_VECTORS if LOCAL_VECTORS.is_dir() else SHARED_VECTORS


@pytest.fixture(scope="session")
def ray_session():
    """Start one local Ray for the session (2 CPUs), shut it down at the end."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
