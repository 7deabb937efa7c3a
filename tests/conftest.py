"""Shared test setup. Fixture modules live in tests/fixtures/ and are registered here."""

from __future__ import annotations

import os

# Never reach a model hub from the tests: every checkpoint is generated locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.gcs",
    "tests.fixtures.models",
    "tests.fixtures.ray_cluster",  # before serve, which imports it
    "tests.fixtures.serve",
]
