"""GPU tests: every test here is marked ``gpu`` and skipped, with the reason, when CUDA is absent.

Collection rule (this file): each item under ``tests/gpu`` gets the ``gpu`` marker, and a skip when
this torch has no usable CUDA device; items marked ``ray`` are skipped too when Ray cannot be
imported (the torch-level tests never import Ray, FastAPI or python-multipart, so they run on a
machine with only torch, transformers, torchvision, pyarrow, Pillow and numpy: ``scripts/gpu-check``).
``make test-gpu`` runs them; on a CPU machine ``make test`` reports them as skipped.

The items run in this order: the torch-level tests, then the compile modes (the slowest: they
compile), then the Ray-level ones, so that a run cut short by its time limit has the rest.

Fixtures: ``cuda`` (the device), ``tf32_off`` (autouse: float32 matmuls and convolutions in IEEE
float32 while a test runs, so that float32 comparisons with the CPU reference are meaningful),
``gpu_figures`` (measured values by name; with ``LLAVA_FEATURES_GPU_FIGURES`` set, the JSON file it
names is rewritten at every new value). With ``LLAVA_FEATURES_GPU_RESULTS`` set, every test's
outcome is appended to that file as a JSON line as soon as it is known. ``scripts/gpu-check``
collects both, so that what ran is known even when the run is stopped.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
FIGURES_ENV = "LLAVA_FEATURES_GPU_FIGURES"
"""Environment variable naming the JSON file the session's measured figures are written to."""
RESULTS_ENV = "LLAVA_FEATURES_GPU_RESULTS"
"""Environment variable naming the JSON-lines file each test's outcome is appended to."""
RUN_LAST = ("test_compile_modes",)
"""Tests (function name prefixes) run after the other torch-level ones: they take the longest."""


def cuda_skip_reason() -> str | None:
    """Why the GPU tests cannot run here (None when they can)."""
    hint = "the GPU tests run with `make test-gpu` or `python3 scripts/gpu-check` on a CUDA machine"
    if torch.version.cuda is None:
        return f"CUDA is not available: torch {torch.__version__} is a CPU build; {hint}"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"CUDA is not available: no CUDA device visible to torch {torch.__version__}{where}; {hint}"
    return None


def ray_skip_reason() -> str | None:
    """Why the Ray-level GPU tests cannot run here (None when Ray imports)."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return (
            "Ray is not installed in this interpreter: the Ray-level GPU tests run where Ray and a GPU meet"
        )
    return None


def _rank(item: pytest.Item) -> int:
    if item.get_closest_marker("ray") is not None:
        return 2
    return 1 if getattr(item, "originalname", item.name).startswith(RUN_LAST) else 0


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_reason = cuda_skip_reason()
    ray_reason = None
    ours = [i for i, item in enumerate(items) if HERE in Path(item.path).resolve().parents]
    ordered = sorted((items[i] for i in ours), key=_rank)  # stable: file order within a rank
    for index, item in zip(ours, ordered, strict=True):
        items[index] = item
    for index in ours:
        item = items[index]
        if item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)
        if cuda_reason is not None:
            item.add_marker(pytest.mark.skip(reason=cuda_reason))
        elif item.get_closest_marker("ray") is not None:
            ray_reason = ray_reason or ray_skip_reason()
            if ray_reason is not None:
                item.add_marker(pytest.mark.skip(reason=ray_reason))


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    """The CUDA device the tests run on."""
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def tf32_off() -> Iterator[None]:
    """IEEE float32 matmuls and convolutions for the test (cuDNN's convolutions default to TF32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path or not report.nodeid.replace("\\", "/").startswith("tests/gpu/"):
        return
    if report.when != "call" and report.passed:
        return  # setup and teardown only say something when they fail or skip
    line = {
        "test": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "seconds": round(report.duration, 3),
    }
    if not report.passed:
        text = report.longreprtext or ""
        line["message"] = text[-2000:] if report.failed else text[:300]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


class FigureBook(dict[str, Any]):
    """A dict of measured figures that rewrites its JSON file (when it has one) at every new value."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = Path(path) if path else None
        if self.path is not None and self.path.is_file():
            self.update(json.loads(self.path.read_text()))

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(dict(self), indent=2, sort_keys=True, default=str) + "\n")


@pytest.fixture(scope="session")
def gpu_figures() -> FigureBook:
    """Measured figures by name (a test sets ``gpu_figures[name] = value``)."""
    return FigureBook(os.environ.get(FIGURES_ENV))
