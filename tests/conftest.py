"""Shared test setup. Fixture modules live in tests/fixtures/ and are registered here."""

from __future__ import annotations

import os

# Never reach a model hub from the tests: every checkpoint is generated locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Never start a Ray behind a test's back: a Serve handle's router thread outlives its module's Ray and,
# with auto-connect on, its next metrics push would start a new local Ray (on Ray's default ports) in
# the test process. Every test starts the Ray it needs explicitly (tests/fixtures/ray_cluster.py).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.gcs",
    "tests.fixtures.models",
    "tests.fixtures.ray_cluster",  # before serve, which imports it
    "tests.fixtures.serve",
]
