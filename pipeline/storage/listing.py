"""Listing what ``--input`` names: folders and prefixes, globs, brace lists, single files.

Local folders are walked by :func:`walk_local`, which never follows a link out of or back into
the tree more than once (each real folder is walked once, a link to a file listed elsewhere is
not listed again) and reports what cannot be read — dangling links, link loops, FIFOs, sockets,
devices — as entries with a ``reason`` instead of dropping them. Object stores are listed through
pyarrow (they have no links).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow.fs as pafs

from ..model.errors import ConfigError, InputReadError
from .fs import filesystem_for, format_uri, relative_path
from .read import _kind_of, _os_error_reason

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
"""Extensions (lower case, with the dot) listed from a directory or prefix; matched case-insensitively."""

MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".parquet", ".csv"})
"""An input file with one of these extensions is read as a manifest (or, with ``input.image_column``,
a Parquet file of images)."""

TAR_EXTENSIONS: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
"""WebDataset shards: tar files (gzip-compressed ones too)."""

_GLOB_CHARS = frozenset("*?[")
_MAX_BRACE_EXPANSION = 10_000_000


@dataclass(frozen=True)
class ListedFile:
    """One listed file: where it is, its name relative to the listing root, and what the store says of it."""

    path: str
    """The path in its filesystem (absolute locally, ``bucket/key`` on object stores)."""
    rel: str
    """The path relative to the listing root (the glob's folder before its first wildcard)."""
    size: int | None = None
    """Bytes, when known."""
    mtime_ns: int | None = None
    """Modification time in ns, when the store gives one."""
    reason: str | None = None
    """Why the entry cannot be read (a dangling link, a FIFO, ...); None for a regular file."""

    @property
    def stamp(self) -> str:
        """``size:mtime_ns``: what the plan fingerprint records of the file's identity."""
        return f"{self.size}:{self.mtime_ns}"


def is_image_path(path: str) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def is_tar_path(path: str) -> bool:
    """Whether ``path`` names a tar file (:data:`TAR_EXTENSIONS`, case-insensitive)."""
    return path.lower().endswith(TAR_EXTENSIONS)


def is_table_path(path: str) -> bool:
    """Whether ``path`` names a Parquet or CSV file (:data:`MANIFEST_EXTENSIONS`, case-insensitive)."""
    return posixpath.splitext(path)[1].lower() in MANIFEST_EXTENSIONS


def extensions_text() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def has_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a path glob, with the semantics of a shell / Python's ``glob``.

    ``*``, ``?`` and ``[...]`` stay within one folder; ``**`` spans folders (``a/**/b`` also
    matches ``a/b``); wildcards never match a name starting with ``.`` unless the pattern spells
    the dot.
    """
    no_dot = r"(?!\.)"
    name = r"[^/]*"
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        at_start = i == 0 or pattern[i - 1] == "/"
        guard = no_dot if at_start else ""
        if c == "*":
            if pattern.startswith("**/", i) and at_start:
                out.append(f"(?:{no_dot}{name}/)*")
                i += 3
            elif pattern.startswith("**", i):
                out.append(f"{guard}{name}(?:/{no_dot}{name})*")
                i += 2
            else:
                out.append(guard + name)
                i += 1
        elif c == "?":
            out.append(guard + "[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j == -1:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : j].replace("\\", "\\\\")
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append(f"{guard}(?!/)[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


# --------------------------------------------------------------------------------------------
# Brace notation: shards/{00000..09999}.tar, {train,val}/*.tar
# --------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")


def _matching_brace(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top(body: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    parts.append(body[last:])
    return parts


def _alternatives(body: str) -> list[str] | None:
    match = _RANGE.match(body)
    if match:
        lo, hi, step = match.group(1), match.group(2), int(match.group(3) or 1)
        if step < 1:
            return None
        width = max(len(lo.lstrip("-")), len(hi.lstrip("-"))) if (lo[0] == "0" or hi[0] == "0") else 0
        a, b = int(lo), int(hi)
        values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        if len(values) > _MAX_BRACE_EXPANSION:
            raise ConfigError(
                f"Brace range {{{body}}} names {len(values)} paths; at most {_MAX_BRACE_EXPANSION}"
            )
        return [f"{v:0{width}d}" if width else str(v) for v in values]
    parts = _split_top(body)
    return parts if len(parts) > 1 else None


def has_braces(path: str) -> bool:
    """Whether ``path`` holds a brace expression (``{a,b}`` or ``{0..9}``) that :func:`expand_braces` expands."""
    return expand_braces(path) != [path]


def expand_braces(pattern: str) -> list[str]:
    """Every path a brace pattern names, in order: ``{a,b}`` alternatives and ``{lo..hi[..step]}``
    numeric ranges (zero-padded to the wider bound when either is written with a leading zero),
    nested and repeated, as WebDataset and the shell expand them. Braces that form neither stay as
    written."""
    i = 0
    while True:
        start = pattern.find("{", i)
        if start == -1:
            return [pattern]
        end = _matching_brace(pattern, start)
        if end == -1:
            return [pattern]
        alternatives = _alternatives(pattern[start + 1 : end])
        if alternatives is None:
            i = start + 1
            continue
        head, tail = pattern[:start], pattern[end + 1 :]
        out: list[str] = []
        tails = expand_braces(tail)
        for alt in alternatives:
            for expanded in expand_braces(alt):
                out.extend(head + expanded + t for t in tails)
                if len(out) > _MAX_BRACE_EXPANSION:
                    raise ConfigError(f"{pattern!r} names more than {_MAX_BRACE_EXPANSION} paths")
        return out


# --------------------------------------------------------------------------------------------
# Local folders
# --------------------------------------------------------------------------------------------


def walk_local(root: str, *, skip_hidden: bool) -> list[ListedFile]:
    """Every file under the local folder ``root``, each real file once, plus unreadable entries.

    Real sub-folders are walked first; then folder links whose target was not walked yet (a link
    out of the tree), each once. A link to a file that is also listed under another name is
    dropped; hard links are separate names and are all listed. Dangling links, link loops and
    special files (FIFOs, sockets, devices) are returned with a ``reason``. ``skip_hidden`` skips
    names starting with ``.`` (folder listings do; globs decide by their pattern). The order is
    the walk's; callers sort.
    """
    files: list[ListedFile] = []
    linked_files: list[tuple[ListedFile, tuple[int, int]]] = []
    real_keys: set[tuple[int, int]] = set()
    try:
        root_stat = os.stat(root)
    except OSError as exc:
        raise InputReadError(f"Could not list {root}: {exc}") from exc
    visited: set[tuple[int, int]] = {(root_stat.st_dev, root_stat.st_ino)}
    folder_links: list[tuple[str, str]] = []
    loops = 0

    def scan(folder: str, rel_folder: str) -> None:
        nonlocal loops
        stack = [(folder, rel_folder)]
        while stack:
            path, rel_base = stack.pop()
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                logger.warning("could not list %s: %s", path, exc)
                continue
            subfolders = []
            for entry in entries:
                if skip_hidden and entry.name.startswith("."):
                    continue
                rel = f"{rel_base}/{entry.name}" if rel_base else entry.name
                try:
                    if entry.is_symlink():
                        try:
                            st = os.stat(entry.path)
                        except OSError as exc:
                            files.append(
                                ListedFile(entry.path, rel, reason=_os_error_reason(entry.path, exc))
                            )
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            folder_links.append((entry.path, rel))
                        elif stat.S_ISREG(st.st_mode):
                            listed = ListedFile(entry.path, rel, st.st_size, st.st_mtime_ns)
                            linked_files.append((listed, (st.st_dev, st.st_ino)))
                        else:
                            files.append(
                                ListedFile(
                                    entry.path, rel, reason=f"{_kind_of(st.st_mode)}, not a regular file"
                                )
                            )
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    files.append(ListedFile(entry.path, rel, reason=_os_error_reason(entry.path, exc)))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in visited:  # a bind mount back into the tree
                        loops += 1
                        continue
                    visited.add(key)
                    subfolders.append((entry.path, rel))
                elif stat.S_ISREG(st.st_mode):
                    real_keys.add((st.st_dev, st.st_ino))
                    files.append(ListedFile(entry.path, rel, st.st_size, st.st_mtime_ns))
                else:
                    files.append(
                        ListedFile(entry.path, rel, reason=f"{_kind_of(st.st_mode)}, not a regular file")
                    )
            stack.extend(reversed(subfolders))

    scan(root, "")
    followed = 0
    while folder_links:  # links found while following links are followed after them, in order
        pending, folder_links[:] = sorted(folder_links, key=lambda link: link[1]), []
        for path, rel in pending:
            try:
                st = os.stat(path)
            except OSError:  # gone meanwhile
                continue
            key = (st.st_dev, st.st_ino)
            if key in visited:  # into the tree again, or a loop (sub/up -> ..)
                loops += 1
                continue
            visited.add(key)
            followed += 1
            scan(path, rel)
    seen_links: set[tuple[int, int]] = set()
    for listed, key in sorted(linked_files, key=lambda item: item[0].rel):
        if key in real_keys or key in seen_links:
            continue  # the same file is listed under its own name (or another link) already
        seen_links.add(key)
        files.append(listed)
    if loops or followed:
        logger.info(
            "%s: followed %d folder link(s) out of the tree; skipped %d link(s) back into it",
            root,
            followed,
            loops,
        )
    return files


# --------------------------------------------------------------------------------------------
# Any store
# --------------------------------------------------------------------------------------------


def list_tree(
    scheme: str, path: str, uri: str, s3_endpoint: str | None, *, skip_hidden: bool
) -> list[ListedFile]:
    """Every file under the folder/prefix ``path`` (recursive), with ``rel`` relative to it."""
    if scheme == "local":
        return walk_local(path, skip_hidden=skip_hidden)
    fs = filesystem_for(scheme, path, s3_endpoint)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise InputReadError(f"Could not list {uri}: {exc}") from exc
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = relative_path(info.path, path)
        if skip_hidden and any(part.startswith(".") for part in rel.split("/")):
            continue
        mtime = info.mtime_ns if info.mtime is not None else None
        out.append(ListedFile(info.path, rel, info.size, mtime))
    return out


def stat_file(scheme: str, path: str, uri: str, s3_endpoint: str | None) -> ListedFile | None:
    """The one file at ``path`` (None when nothing is there; a folder raises ConfigError upstream)."""
    if scheme == "local":
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                return ListedFile(
                    path, posixpath.basename(path), reason=_os_error_reason(path, FileNotFoundError(2, ""))
                )
            return None
        except OSError as exc:
            return ListedFile(path, posixpath.basename(path), reason=_os_error_reason(path, exc))
        if stat.S_ISDIR(st.st_mode):
            return ListedFile(path, "", reason="folder")
        reason = None if stat.S_ISREG(st.st_mode) else f"{_kind_of(st.st_mode)}, not a regular file"
        return ListedFile(path, posixpath.basename(path), st.st_size, st.st_mtime_ns, reason)
    fs = filesystem_for(scheme, path, s3_endpoint)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise InputReadError(f"Could not access {uri}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.Directory:
        return ListedFile(path, "", reason="folder")
    mtime = info.mtime_ns if info.mtime is not None else None
    return ListedFile(path, posixpath.basename(path), info.size, mtime)


def list_pattern(scheme: str, path: str, uri: str, s3_endpoint: str | None) -> list[ListedFile]:
    """The files a glob and/or brace pattern names, each once, ``rel`` relative to the folder before
    the pattern's first wildcard or brace. Paths named without wildcards must all exist."""
    parts = path.split("/")
    first = next(i for i, part in enumerate(parts) if has_glob(part) or has_braces(part))
    if scheme != "local" and first == 0:
        raise ConfigError(f"Globs are not supported in the bucket name: {uri}")
    base = "/".join(parts[:first]) or "/"
    patterns = expand_braces(path)
    literal = [p for p in patterns if not has_glob(p)]
    regexes = [glob_to_regex(p) for p in patterns if has_glob(p)]
    found: dict[str, ListedFile] = {}
    if literal:
        if scheme == "local" or len(literal) <= 16:
            for p in literal:
                listed = stat_file(scheme, p, format_uri(scheme, p), s3_endpoint)
                if listed is not None and listed.reason != "folder":
                    found.setdefault(p, listed)
        else:  # many names on an object store: one listing of their common folder
            wanted = set(literal)
            for listed in list_tree(scheme, base, uri, s3_endpoint, skip_hidden=False):
                if listed.path in wanted:
                    found.setdefault(listed.path, listed)
        missing = [p for p in literal if p not in found]
        if missing:
            raise ConfigError(
                f"{len(missing)} of the {len(literal)} files named by {uri} do not exist, e.g. "
                f"{format_uri(scheme, missing[0])}"
            )
    if regexes:
        for listed in list_tree(scheme, base, uri, s3_endpoint, skip_hidden=False):
            if listed.path not in found and any(r.match(listed.path) for r in regexes):
                found[listed.path] = listed
    if not found:
        raise ConfigError(f"No files match the glob {uri}")
    return [
        ListedFile(f.path, relative_path(f.path, base), f.size, f.mtime_ns, f.reason) for f in found.values()
    ]


def sort_listing(files: Iterable[ListedFile]) -> list[ListedFile]:
    """Files sorted by path: the listing order of every input kind."""
    return sorted(files, key=lambda f: f.path)


__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "TAR_EXTENSIONS",
    "ListedFile",
    "expand_braces",
    "extensions_text",
    "glob_to_regex",
    "has_braces",
    "has_glob",
    "is_image_path",
    "is_table_path",
    "is_tar_path",
    "list_pattern",
    "list_tree",
    "sort_listing",
    "stat_file",
    "walk_local",
]
