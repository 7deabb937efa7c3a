"""WebDataset tar shards (img2dataset, DataComp, LAION): one unit per tar, read as a stream.

Members are grouped into samples by key, as WebDataset does: the member name up to the first dot
of its base name (``shard/000123.jpg`` → key ``shard/000123``, extension ``jpg``; consecutive
members with one key form one sample; names without an extension are skipped). A sample's image
is its first member with an image extension; ``image_id`` is the ``key`` field of its ``.json``
member when it has one, else the key; ``uri`` is ``<tar uri>#<image member name>``.

Carried columns (``input.keep_columns``) come from the sample's members: a member whose extension
is the column's name (``txt``, ``cls``, ...), ``caption`` from ``txt``, else a top-level field of
the ``.json`` member (text as it is; other JSON values as JSON text). They are text columns.

A sample whose image member is a link (symbolic or hard: the tar holds no data for it) gets a
``read_failed`` row; links are never followed, and linked sidecars are left out.

A tar never fails the job: an unreadable tar gives one error row (``image_id`` = the tar's path
relative to the input); a tar that ends inside a member gives that sample an error row
(``truncated``); a corrupt header or a tar cut short between members gives an error row
``<tar path>@<byte offset>`` after the samples read before it.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..model.errors import ErrorCode, InputReadError
from .listing import IMAGE_EXTENSIONS
from .read import open_input
from .units import Sample, Unit

logger = logging.getLogger(__name__)

_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)[.]([^/]*)$")
_IMAGE_EXTS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_JSON_LIMIT = 1 << 20
CAPTION_ALIASES = {"caption": "txt"}
"""Carried column → the member extension it is read from when no member has the column's own name."""


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name (extension lower case), None when it has no extension."""
    match = _MEMBER.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


def _is_image_ext(ext: str) -> bool:
    return ext in _IMAGE_EXTS or ext.rsplit(".", 1)[-1] in _IMAGE_EXTS


class _HeaderTracking(tarfile.TarInfo):
    """Records why reading a header failed, which ``tarfile`` hides when it stops iterating."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf._llava_header_error = exc  # type: ignore[attr-defined]
            raise


@dataclass
class _Group:
    key: str
    members: list[str] = field(default_factory=list)
    image_name: str | None = None
    image: bytes | None = None
    image_error: InputReadError | None = None
    texts: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] | None = None


def _needed_exts(keep: Sequence[str]) -> set[str]:
    out = {"json"}
    for column in keep:
        out.add(column.lower())
        if column in CAPTION_ALIASES:
            out.add(CAPTION_ALIASES[column])
    return out


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(member)
    if f is None:  # pragma: no cover - regular files always have data
        return b""
    data = f.read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of data in {member.name}")
    return data


def _carried(group: _Group, keep: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in keep:
        ext = column.lower()
        if ext in group.texts:
            out[column] = group.texts[ext]
        elif column in CAPTION_ALIASES and CAPTION_ALIASES[column] in group.texts:
            out[column] = group.texts[CAPTION_ALIASES[column]]
        elif group.meta is not None and column in group.meta:
            value = group.meta[column]
            out[column] = value if isinstance(value, str) or value is None else json.dumps(value)
        else:
            out[column] = None
    return out


def _sample(group: _Group, unit: Unit, keep: Sequence[str]) -> Sample:
    key = group.meta.get("key") if group.meta else None
    image_id = key if isinstance(key, str) and key.strip() else group.key
    uri = f"{unit.source}#{group.image_name or group.key}"
    carried = _carried(group, keep)
    if group.image_error is not None:
        return Sample(image_id, uri, error=group.image_error, carried=carried)
    if group.image_name is None:
        exts = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in group.members})) or "none"
        error = InputReadError(f"Sample {group.key!r} of {unit.source} has no image member (members: {exts})")
        return Sample(image_id, uri, error=error, carried=carried)
    return Sample(image_id, uri, data=group.image, carried=carried)


def tar_samples(
    unit: Unit,
    *,
    keep: Sequence[str] = (),
    max_bytes: int | None = None,
    timeout_s: float | None = None,
    s3_endpoint: str | None = None,
) -> Iterator[Sample]:
    """The samples of the tar of ``unit``, in member order, each with its image bytes or an error."""
    needed = _needed_exts(keep)
    wanted = {c.lower() for c in keep}
    try:
        stream = open_input(unit.source, s3_endpoint=s3_endpoint, timeout_s=timeout_s)
    except InputReadError as exc:
        yield Sample(unit.name, unit.source, error=exc)
        return
    group: _Group | None = None
    reading: str | None = None  # the member being read when a failure happens
    last_member = ""
    with stream:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_HeaderTracking)  # noqa: SIM115 (closed with the stream)
        except (tarfile.TarError, OSError, EOFError, zlib.error, InputReadError) as exc:
            reason = exc.message if isinstance(exc, InputReadError) else f"not a readable tar file ({exc})"
            yield Sample(
                unit.name, unit.source, error=InputReadError(f"Could not read {unit.source}: {reason}")
            )
            return
        try:
            for member in tf:
                tf.members = []  # a streamed tar keeps every header otherwise
                last_member = member.name
                linked = member.issym() or member.islnk()
                if not (member.isfile() or linked):
                    continue
                parts = split_member(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if group is None or key != group.key:
                    if group is not None:
                        yield _sample(group, unit, keep)
                    group = _Group(key)
                group.members.append(member.name)
                reading = member.name
                if linked:  # no data in the tar: never followed (a link may point anywhere, or nowhere)
                    if _is_image_ext(ext) and group.image_name is None:
                        kind = "symbolic link" if member.issym() else "hard link"
                        group.image_name = member.name
                        group.image_error = InputReadError(
                            f"Could not read {unit.source}#{member.name}: a {kind} to {member.linkname!r} "
                            "(tar links are not followed)"
                        )
                    reading = None
                    continue
                if _is_image_ext(ext) and group.image_name is None:
                    group.image_name = member.name
                    if max_bytes is not None and member.size > max_bytes:
                        group.image_error = InputReadError(
                            f"Could not read {unit.source}#{member.name}: larger than {max_bytes} bytes",
                            code=ErrorCode.TOO_LARGE,
                        )
                    else:
                        group.image = _read_member(tf, member)
                elif ext == "json" and member.size <= _JSON_LIMIT:
                    raw = _read_member(tf, member)
                    if "json" in wanted:  # the sidecar itself is a carried column
                        group.texts["json"] = raw.decode("utf-8", errors="replace")
                    try:
                        meta = json.loads(raw)
                        group.meta = meta if isinstance(meta, dict) else None
                    except ValueError:
                        group.meta = None
                elif ext in needed and (max_bytes is None or member.size <= max_bytes):
                    group.texts[ext] = _read_member(tf, member).decode("utf-8", errors="replace")
                reading = None
            if group is not None:
                yield _sample(group, unit, keep)
                group = None
            ending = _ending_problem(tf, last_member)
            if ending is not None:
                yield Sample(
                    f"{unit.name}@{tf.offset}",
                    unit.source,
                    error=InputReadError(
                        f"{unit.source}: {ending}",
                        code=ErrorCode.TRUNCATED if "ends" in ending else ErrorCode.READ_FAILED,
                    ),
                )
        except (tarfile.TarError, OSError, EOFError, zlib.error, InputReadError) as exc:
            detail = exc.message if isinstance(exc, InputReadError) else f"{type(exc).__name__}: {exc}"
            timed_out = isinstance(exc, InputReadError)
            if group is not None and reading is not None:
                code = ErrorCode.READ_FAILED if timed_out else ErrorCode.TRUNCATED
                group.image_error = InputReadError(
                    f"{unit.source}: the tar ends inside member {reading} ({detail})"
                    if not timed_out
                    else detail,
                    code=code,
                )
                yield _sample(group, unit, keep)
            else:
                if group is not None:
                    yield _sample(group, unit, keep)
                yield Sample(
                    f"{unit.name}@{tf.offset}",
                    unit.source,
                    error=InputReadError(f"{unit.source}: unreadable tar data at byte {tf.offset}: {detail}"),
                )


def _ending_problem(tf: tarfile.TarFile, last_member: str) -> str | None:
    """Why a tar that ``tarfile`` stopped reading did not end properly (None when it did)."""
    error = getattr(tf, "_llava_header_error", None)
    after = f"after member {last_member}" if last_member else "before any member"
    if error is None or isinstance(error, tarfile.EOFHeaderError):
        return None  # the end-of-archive marker
    if isinstance(error, tarfile.EmptyHeaderError | tarfile.TruncatedHeaderError):
        return f"the tar ends early at byte {tf.offset} ({after}, no end-of-archive marker): members after it are missing"
    return f"corrupt tar header at byte {tf.offset} ({after}: {error}); the rest of the tar is unreadable"
