"""The layering rules: pipeline.model is pure torch + transformers, nothing imports upward,
and importing any module has no side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_MODEL = ("ray", "PIL", "pyarrow", "fastapi", "starlette", "deployments")


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported by a file (relative imports resolved), with their level."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((name, node.level))
    return out


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("pipeline/model"), ids=lambda p: p.name)
def test_model_package_is_pure_torch_and_transformers(path):
    for name, _ in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_IN_MODEL, f"{path.name} imports {name}"
        if top == "pipeline":
            assert name.startswith("pipeline.model"), f"{path.name} imports upward: {name}"


@pytest.mark.parametrize("path", _modules("pipeline"), ids=lambda p: str(p.relative_to(REPO)))
def test_pipeline_never_imports_deployments(path):
    assert all(not name.startswith("deployments") for name, _ in _imports(path)), path


def test_imports_have_no_side_effects():
    code = (
        "import importlib, pkgutil, sys\n"
        "import pipeline.model.errors, pipeline.model.config, pipeline.config\n"
        "assert 'torch' not in sys.modules, 'errors/config pulled in torch'\n"
        "import pipeline, deployments\n"
        "for pkg in (pipeline, deployments):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "import ray\n"
        "assert not ray.is_initialized(), 'a module started Ray at import'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    assert not list(REPO.glob("*.parquet"))
