"""The layering rules, checked on the sources: imports (real ones and import paths written as
strings) only go downward, the model package is pure torch + transformers, the command line is
the only layer above both front doors, and importing any module has no side effects.

Layers, bottom to top, numbered as in :data:`LAYERS` and docs/architecture.md (a module may import its
own layer and the ones below):

0. ``pipeline.model.errors``, ``pipeline.model.config``, ``pipeline.model.constants``,
   ``pipeline.config``, ``pipeline.constants``, ``pipeline.memory``: pure Python (errors, config,
   vocabulary, the process's memory);
1. ``pipeline.model``: torch + transformers (never ray, PIL, pyarrow);
2. ``pipeline.images``, ``pipeline.storage``, ``pipeline.table`` (the feature table), ``pipeline.records``,
   ``pipeline.measure`` (what the benchmarks of both front doors measure with);
3. ``pipeline.encoder``;
4. ``pipeline.shards`` (a decoded shard → its committed file: run by both front doors' pools);
5. ``pipeline.offline`` (the job), ``pipeline.demo``, ``pipeline.bench`` | ``deployments`` (the two front doors; the
   ``pipeline`` package facade, with its lazy ``read_features``, sits here too);
6. ``llava_features`` (the command line).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "deployments", "llava_features")
FORBIDDEN_IN_MODEL = ("ray", "PIL", "pyarrow", "fastapi", "starlette", "deployments", "llava_features")

LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "pipeline.model.errors",
        "pipeline.model.config",
        "pipeline.model.constants",
        "pipeline.config",
        "pipeline.constants",
        "pipeline.memory",
    ),
    ("pipeline.model",),
    (
        "pipeline.images",
        "pipeline.storage",
        "pipeline.table",
        "pipeline.records",
        "pipeline.measure",
    ),
    ("pipeline.encoder",),
    ("pipeline.shards",),
    # The package facade (``pipeline.__version__``, a lazy ``read_features``) sits with the front doors.
    ("pipeline", "pipeline.offline", "pipeline.demo", "pipeline.bench", "deployments"),
    ("llava_features",),
)
FRONT_DOORS = (("pipeline.offline", "pipeline.demo", "pipeline.bench"), ("deployments",))
"""The offline and the online layer: neither imports the other (the command line imports both)."""

# An import path written as a string: "pipeline.x.y", "deployments.app:build_app", ...
_MODULE_STRING = re.compile(r"^(pipeline|deployments|llava_features)(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?$")


def _layer(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _door(module: str) -> int | None:
    for index, prefixes in enumerate(FRONT_DOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, str]]:
    """``(module, how)`` for every import of a file (see :func:`imports_in`)."""
    module = _module_name(path)
    return imports_in(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def imports_in(source: str, package: str) -> list[tuple[str, str]]:
    """``(module, how)`` for every import of a module of ``package``: ``import``/``from`` statements
    (relative ones resolved) and string constants that spell one of our import paths
    (``importlib.import_module("...")``, ``__import__``, ``"module:attr"`` builder paths)."""
    out: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, "import") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
                if not node.module:  # from . import x, y: each is a module of the package
                    out += [(f"{name}.{alias.name}", "import") for alias in node.names]
                    continue
            else:
                name = node.module or ""
            out.append((name, "import"))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.match(node.value)
        ):
            name = node.value.split(":")[0]
            if _exists(name):  # "llava_features.tensor" is an Arrow extension name, not a module
                out.append((name, "string"))
    return out


def _exists(module: str) -> bool:
    """Whether ``module`` is one of the repository's modules or packages."""
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_only_go_down(path):
    here = _module_name(path)
    for name, how in imports_of(path):
        if not _ours(name):
            continue
        assert _layer(name) <= _layer(here), f"{here} imports {name} ({how}), a layer above it"
        a, b = _door(here), _door(name)
        assert a is None or b is None or a == b, (
            f"{here} imports {name} ({how}): the front doors are separate"
        )


@pytest.mark.parametrize("path", sorted((REPO / "pipeline" / "model").rglob("*.py")), ids=lambda p: p.name)
def test_model_package_is_pure_torch_and_transformers(path):
    for name, _ in imports_of(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_IN_MODEL, f"{path.name} imports {name}"
        if top == "pipeline":
            assert name.startswith("pipeline.model"), f"{path.name} imports upward: {name}"


@pytest.mark.parametrize("path", sorted((REPO / "pipeline" / "table").rglob("*.py")), ids=lambda p: p.name)
def test_the_table_knows_no_model_and_no_ray(path):
    """The feature table writes and reads data files and the log; encoding them is the encoder's."""
    for name, _ in imports_of(path):
        top = name.split(".")[0]
        assert top not in ("ray", "transformers", "PIL"), f"{path.name} imports {name}"
        if name.startswith("pipeline.model"):
            assert name == "pipeline.model.errors", f"{path.name} imports {name}: the table knows no model"
        assert not name.startswith(("pipeline.encoder", "pipeline.shards", "pipeline.records")), name


def test_the_checker_sees_string_imports():
    """An import path written as a string is an import, and an upward one fails the rule."""
    source = 'import importlib\nBUILDER = "deployments.app:build_app"\nimportlib.import_module("llava_features.cli")\n'
    found = imports_in(source, "pipeline.bench")
    assert ("deployments.app", "string") in found and ("llava_features.cli", "string") in found
    here = "pipeline.bench.probe"
    assert _door("deployments.app") != _door(here) and _layer("llava_features.cli") > _layer(here)


def test_help_and_argument_errors_import_no_torch():
    """``llava-features --help`` and a bad argument load neither torch, transformers nor ray."""
    code = (
        "import sys\n"
        "from llava_features.cli import main\n"
        "for argv in (['--help'], ['encode', '--help'], ['encode', '--features', 'nope', '--model', 'x',"
        " '--input', 'i', '--output', 'o']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'pyarrow', 'PIL') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-2000:]
    assert "invalid choice: 'nope'" in proc.stderr


def test_imports_have_no_side_effects():
    code = (
        "import importlib, pkgutil, sys\n"
        "import pipeline.model.errors, pipeline.model.config, pipeline.config\n"
        "assert 'torch' not in sys.modules, 'errors/config pulled in torch'\n"
        "import pipeline, deployments, llava_features\n"
        "for pkg in (pipeline, deployments, llava_features):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name != 'llava_features.__main__':\n"
        "            importlib.import_module(m.name)\n"
        "import ray\n"
        "assert not ray.is_initialized(), 'a module started Ray at import'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    assert not list(REPO.glob("*.parquet"))
