"""The documentation stays true: README.md and docs/*.md against the code.

- docs/configuration.md is what ``llava-features config-reference`` prints (it is generated);
- every ``llava-features`` command in a shell block of the pages parses with the command line's own
  parser: documented flags are real flags, with valid values;
- docs/architecture.md's tables of layers and front doors are the ones tests/test_architecture.py
  enforces;
- the blocks marked runnable (info string ```` ```bash runnable ````; renderers still highlight them
  as bash) run, in order, and do what the pages say.

Runnable blocks run with ``bash -eu -o pipefail``, the pages one after the other in :data:`RUN_ORDER`,
all in one fresh folder, so that a page can go on from the README's example as it says it does. The
folder holds, before the first block, what the pages say a reader brings: ``images/`` (three photos)
and ``new-images/`` (two more, which docs/offline.md adds with ``--append``). The commands are the
installed ones (the interpreter's ``bin`` first on ``PATH``), importing this checkout's packages
(``PYTHONPATH``); no Ray address or token of the environment is passed on.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llava_features.cli import build_parser
from llava_features.reference import config_reference
from tests.corpus import encode, real_photos
from tests.fixtures.markdown import Block, blocks_of, logical_lines
from tests.fixtures.ray_cluster import ADDRESS_ENV_VARS, AUTH_ENV_VARS
from tests.test_architecture import FRONT_DOORS, LAYERS

REPO = Path(__file__).resolve().parent.parent
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
RUN_ORDER = ("README.md", "docs/offline.md", "docs/fidelity.md")
"""The pages with runnable blocks, in the order they run (later pages go on from the README's)."""
PHOTOS = {"images": ("astronaut", "coffee", "chelsea"), "new-images": ("rocket", "camera")}
"""What the folder holds before the first block: scikit-image's sample photos, by folder."""

_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


def _page_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks_of(page.read_text(), str(page.relative_to(REPO)))]


def _words(line: str) -> list[str]:
    """A shell line's first simple command, as the shell splits it: quotes removed, a comment dropped,
    cut at the first operator (``|``, ``>``, ``&&``, ``;``: what follows is not its arguments)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for word in lexer:
        if word and all(c in lexer.punctuation_chars for c in word):
            if word[0] in "<>" and words and words[-1].isdigit():  # 2>&1: the 2 is the redirection's
                words.pop()
            break
        words.append(word)
    return words


def llava_features_commands(script: str) -> list[list[str]]:
    """Every ``llava-features`` command of a shell script, as its arguments: a line's command after an
    optional ``$ `` prompt, ``VAR=value`` assignments and ``time`` (with its options), or the one
    ``ray job submit ... --`` runs."""
    found = []
    for line in logical_lines(script):
        text = line.strip()
        words = _words(text[2:] if text.startswith("$ ") else text)
        while words and _ASSIGNMENT.match(words[0]):
            words.pop(0)
        if words[:1] in (["time"], ["/usr/bin/time"]):
            words.pop(0)
            while words and words[0].startswith("-"):
                words.pop(0)
        if "--" in words and words[words.index("--") + 1 : words.index("--") + 2] == ["llava-features"]:
            words = words[words.index("--") + 1 :]
        if words[:1] == ["llava-features"]:
            found.append(words[1:])
    return found


DOCUMENTED = [
    (block, args) for block in _page_blocks() if block.shell for args in llava_features_commands(block.text)
]


def test_configuration_reference_is_current():
    assert (REPO / "docs" / "configuration.md").read_text() == config_reference(), (
        "docs/configuration.md is not what the code gives: run "
        "`llava-features config-reference > docs/configuration.md`"
    )


@pytest.mark.parametrize(
    ("block", "args"), DOCUMENTED, ids=[f"{b.page}:{b.line}:{' '.join(a[:1])}" for b, a in DOCUMENTED]
)
def test_documented_command_parses(block, args):
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:  # argparse's way of refusing (it printed why on stderr)
        pytest.fail(
            f"{block.page}, the block at line {block.line}: llava-features {shlex.join(args)} ({exc})"
        )


def test_the_pages_document_every_command():
    """The commands are found (a broken extraction would pass the test above with nothing in it)."""
    subcommands = {args[0] for _, args in DOCUMENTED}
    assert {"encode", "inspect", "serve", "info", "verify", "make-tiny-model", "bench"} <= subcommands, (
        subcommands
    )
    assert {b.page for b, _ in DOCUMENTED} >= {
        "README.md",
        "docs/offline.md",
        "docs/serving.md",
        "docs/cluster.md",
    }


def test_the_extraction_sees_what_a_shell_runs():
    """Prompts, assignments, continuations, ``ray job submit --``, comments and loops; a wrong flag fails."""
    script = (
        "$ llava-features info --model m > info.json 2>&1  # a comment --not-a-flag\n"
        "RAY_AUTH_MODE=token ray job submit --address http://h:8265 -- \\\n"
        "    llava-features encode --model m --input i --output o\n"
        "for mode in default reduce-overhead; do\n"
        "  llava-features bench encoder --tiny --compile-mode $mode\n"
        "done\n"
        "/usr/bin/time -v llava-features inspect o\n"
        "echo llava-features is not a command here\n"
        "llava-features encode --model m --input i --output o --no-such-flag\n"
    )
    found = llava_features_commands(script)
    assert found[:5] == [
        ["info", "--model", "m"],
        ["encode", "--model", "m", "--input", "i", "--output", "o"],
        ["bench", "encoder", "--tiny", "--compile-mode", "default"],
        ["bench", "encoder", "--tiny", "--compile-mode", "reduce-overhead"],
        ["inspect", "o"],
    ]
    assert len(found) == 6
    for args in found[:5]:
        build_parser().parse_args(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(found[5])
    blocks = blocks_of("```bash runnable\nls\n```\n\n```bash\nls\n```\n\n```python\nx = 1\n```\n", "p")
    assert [(b.shell, b.runnable, b.line) for b in blocks] == [
        (True, True, 1),
        (True, False, 5),
        (False, False, 9),
    ]


def _table_rows(text: str, heading: str) -> dict[str, tuple[str, ...]]:
    """The first column → the backquoted names of the second, for the table after ``heading``'s
    paragraph in a Markdown page."""
    section = text.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= set("-: "):
            rows[cells[0]] = tuple(re.findall(r"`([\w.]+)`", cells[1]))
        elif rows and not line.startswith("|"):
            break
    return rows


def test_the_architecture_page_states_the_enforced_layers():
    """docs/architecture.md's layers and front doors are LAYERS and FRONT_DOORS, name for name."""
    text = (REPO / "docs" / "architecture.md").read_text()
    layers = _table_rows(text, "## The layers")
    del layers["layer"]
    assert layers == {str(i): modules for i, modules in enumerate(LAYERS)}, layers
    doors = _table_rows(text, "The two front doors, `FRONT_DOORS`")
    del doors["front door"]
    assert tuple(doors.values()) == FRONT_DOORS and list(doors) == ["offline", "online"], doors


def test_runnable_blocks_are_on_the_pages_that_run():
    runnable = {b.page for b in _page_blocks() if b.runnable}
    assert runnable == set(RUN_ORDER), f"runnable blocks on {sorted(runnable)}: list their pages in RUN_ORDER"


def _write_photos(folder: Path) -> None:
    from PIL import Image

    photos = real_photos()
    for sub, names in PHOTOS.items():
        (folder / sub).mkdir()
        for name in names:
            (folder / sub / f"{name}.jpg").write_bytes(encode(Image.fromarray(photos[name]), "JPEG"))


def _run(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", "-eu", "-o", "pipefail", "-c", block.text],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"{block.page}, the block at line {block.line} exited {proc.returncode}",
        proc.stdout[-2000:],
        proc.stderr[-3000:],
    )
    return proc


@pytest.mark.slow
def test_runnable_blocks_run(tmp_path):
    from pipeline import read_features

    _write_photos(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in (*AUTH_ENV_VARS, *ADDRESS_ENV_VARS)}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO))
    runnable = {page: [b for b in _page_blocks() if b.runnable and b.page == page] for page in RUN_ORDER}

    # README: a tiny checkpoint, a job on the three photos, inspect, and the features read back.
    out = "".join(_run(block, tmp_path, env).stdout for block in runnable["README.md"])
    assert "(3, 16, 64)" in out.splitlines(), out[-2000:]
    first = read_features(tmp_path / "features", status=None)
    assert (len(first.image_ids), first.state) == (3, "complete"), (first.image_ids, first.state)

    # docs/offline.md: two new photos appended to the same table, nothing encoded twice.
    for block in runnable["docs/offline.md"]:
        _run(block, tmp_path, env)
    table = read_features(tmp_path / "features")
    expected = sorted(f"{name}.jpg" for names in PHOTOS.values() for name in names)
    assert sorted(table.image_ids) == expected, table.image_ids
    assert table.features.shape == (5, 16, 64) and table.state == "complete"
    assert len(list(tmp_path.joinpath("features").glob("part-s002-*.parquet"))) == 1

    # docs/fidelity.md: info on the same checkpoint gives the fingerprint the table records.
    for block in runnable["docs/fidelity.md"]:
        _run(block, tmp_path, env)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["fingerprint"] == table.identity.fingerprint
