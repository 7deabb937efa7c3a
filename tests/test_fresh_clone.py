"""The repository carries what its tests need: a ``git clone`` of this checkout, alone in an empty
temporary folder (nothing beside it, no folder of test data above it), passes the KubeRay tests
(whose CRD schemas are test data in tests/data/) and a quick, Ray-free subset of the suite.

The clone holds the committed files (HEAD), as a user's clone does: uncommitted changes are not in
it. The subset runs with the current interpreter and its installed dependencies, but imports the
clone's own packages (its folder first on ``sys.path``), which the child checks before it starts
pytest: a test run against this checkout's code would prove nothing about the clone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "deployments", "llava_features", "tests")
QUICK_SUBSET = ("tests/test_kuberay.py", "tests/test_config.py", "tests/test_architecture.py")
"""Fast and Ray-free: no cluster, no server; the KubeRay tests are the ones that read test data."""

# Imports the packages from the working directory (the clone: '' is first on sys.path with -c),
# reports where they came from, then runs pytest in the same process, so the tests use them.
_CHILD = """
import importlib, json, sys
import pytest
print("IMPORTED " + json.dumps({p: importlib.import_module(p).__file__ for p in PACKAGES}), flush=True)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *ARGS]))
"""


def _clone(into: Path) -> Path:
    clone = into / "llava-features"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return clone


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout (an sdist, an image)")
def test_a_fresh_clone_alone_in_an_empty_folder_passes_the_quick_subset(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    clone = _clone(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["llava-features"], "nothing beside the clone"
    assert all((clone / t).is_file() for t in QUICK_SUBSET), "the subset is committed"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "KUBERAY_CRD_DIR") and not k.startswith("RAY_")
    }
    env["PYTHONPATH"] = str(clone)  # as well as '' (the working directory): the clone, never this checkout
    child = _CHILD.replace("PACKAGES", repr(PACKAGES)).replace("ARGS", repr(QUICK_SUBSET))
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("IMPORTED ")]
    imported = json.loads(line.removeprefix("IMPORTED "))
    for package, file in imported.items():
        assert Path(file).resolve().is_relative_to(clone.resolve()), (package, file)
    assert result.returncode == 0, output[-6000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0 and not re.search(r"\d+ (failed|errors?)\b", summary), summary
