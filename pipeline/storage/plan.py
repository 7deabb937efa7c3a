"""Planning a job: what ``--input`` names, cut into :class:`~pipeline.storage.units.Unit` s.

:func:`plan_inputs` lists files (names, sizes, mtimes) and reads Parquet footers; it never reads
images, tar members or rows of Parquet image files (it streams the uri and id columns of
manifests to check them: non-empty, UTF-8, a known scheme, unique ids).
Its cost is in proportion to the units, not to the images inside tars and Parquet files.
:func:`expand_unit` is the other half, run by the decode tasks: a unit's samples with their bytes,
``shard_size`` at a time.

The older helpers (:func:`list_inputs`, :func:`plan_shards`, :func:`plan_fingerprint`) list and cut
individual image inputs, as the job did before units.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from ..constants import INPUT_FORMATS, InputFormat
from ..model.errors import ConfigError, ErrorCode, InputReadError
from .fs import absolute_uri, format_uri, split_uri
from .images_parquet import image_samples, image_units, inspect_image_file
from .listing import (
    MANIFEST_EXTENSIONS,
    TAR_EXTENSIONS,
    ListedFile,
    extensions_text,
    has_braces,
    has_glob,
    is_image_path,
    is_table_path,
    is_tar_path,
    list_pattern,
    list_tree,
    sort_listing,
    stat_file,
)
from .manifest import RowChecker, inspect_manifest, manifest_samples, manifest_units
from .read import read_bytes
from .units import CarriedType, InputItem, Sample, Unit
from .webdataset import tar_samples

logger = logging.getLogger(__name__)

PLAN_VERSION = "llava-features/plan/v2"
UNIT_KEY_VERSION = "llava-features/unit/v1"
_LEGACY_PLAN_VERSION = "llava-features/plan/v1"


@dataclass(frozen=True)
class InputOptions:
    """How to read ``--input`` (the ``input`` config section)."""

    format: InputFormat = "auto"
    image_column: str | None = None
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReadOptions:
    """What a decode task needs to expand units (plain values: they cross the Ray hop)."""

    s3_endpoint: str | None = None
    threads: int = 8
    max_bytes: int | None = None
    timeout_s: float | None = None
    image_column: str | None = None
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()


@dataclass
class InputPlan:
    """The units of a job and what the driver knows about them."""

    input: str
    """``--input``, local paths made absolute."""
    kind: str
    """``images``, ``manifest``, ``webdataset`` or ``parquet``."""
    units: list[Unit]
    shard_size: int
    """Rows per output file."""
    files: int
    """Source files listed (images, manifests, tars or Parquet files)."""
    source_bytes: int | None
    """Bytes of the source files, when the store gives every size."""
    carried: dict[str, CarriedType] = field(default_factory=dict)
    """``input.keep_columns`` and their output types, in order."""
    options: dict[str, Any] = field(default_factory=dict)
    """The input options the plan was made with (recorded in ``_job.json``)."""
    fingerprint: str = ""
    """sha256 over the unit list: kinds, paths, sizes and mtimes, row ranges, ids (see :func:`fingerprint_units`)."""
    header: dict[str, Any] = field(default_factory=dict)
    """What the fingerprint covers besides the units (kind, shard size, limit, input options)."""
    _keys: list[str] | None = field(default=None, repr=False, compare=False)

    def unit_key(self, unit: Unit) -> str:
        """Hex sha256 of what ``unit`` reads and how: its source, stamp, rows and inline inputs, and the
        input options. The same unit in another plan of the same files has the same key (an append
        recognises what a table holds already); a changed file, row range or option gives another."""
        return _unit_key(self.options, unit)

    def unit_keys(self) -> list[str]:
        """:meth:`unit_key` of every unit, in order (computed once)."""
        if self._keys is None or len(self._keys) != len(self.units):
            prefix = json.dumps([UNIT_KEY_VERSION, self.options], sort_keys=True)
            self._keys = [_unit_key(self.options, u, prefix) for u in self.units]
        return self._keys

    def without(self, exclude: Callable[[Sequence[str]], Any], done: Collection[str]) -> InputPlan:
        """This plan less what a table holds already (``--append``): units whose key is in ``done`` are
        left out, and so are listed inputs (files of a folder, CSV manifest rows: their ids are known
        before reading) whose id ``exclude`` flags (``exclude(ids)`` gives one bool per id); the inputs
        left are cut into units again. Other units' inputs are only known once read: the decode stage
        leaves out theirs."""
        units: list[Unit] = []
        groups: dict[tuple[str, str, str], list[tuple[InputItem, tuple[Any, ...]]]] = {}
        order: list[tuple[str, str, str]] = []

        def flush() -> None:
            for group in order:
                entries = groups.pop(group)
                names = [name for name, _ in source_columns.get(group, ())]
                for start in range(0, len(entries), self.shard_size):
                    chunk = entries[start : start + self.shard_size]
                    units.append(
                        Unit(
                            index=len(units),
                            kind="items",
                            source=group[0],
                            name=group[1],
                            stamp=group[2],
                            items=tuple(item for item, _ in chunk),
                            columns=tuple(
                                (name, tuple(v[j] for _, v in chunk)) for j, name in enumerate(names)
                            ),
                        )
                    )
            order.clear()

        source_columns: dict[tuple[str, str, str], tuple[tuple[str, tuple[Any, ...]], ...]] = {}
        for unit in self.units:
            if unit.kind != "items":
                flush()
                if self.unit_key(unit) not in done:
                    units.append(replace(unit, index=len(units)))
                continue
            group = (unit.source, unit.name, unit.stamp)
            if group not in groups:
                groups[group] = []
                order.append(group)
                source_columns[group] = unit.columns
            flags = exclude([item.image_id for item in unit.items])
            for j, item in enumerate(unit.items):
                if not flags[j]:
                    groups[group].append((item, tuple(values[j] for _, values in unit.columns)))
        flush()
        header = {**self.header, "without": True}
        return replace(
            self, units=units, fingerprint=fingerprint_units(units, header), header=header, _keys=None
        )

    @property
    def rows(self) -> int | None:
        """Input rows of the job; None when some units' rows are only known once read (tars)."""
        total = 0
        for unit in self.units:
            if unit.rows is None:
                return None
            total += unit.rows
        return total

    @property
    def known_rows(self) -> int:
        return sum(u.rows or 0 for u in self.units)

    @property
    def unknown_units(self) -> int:
        return sum(u.rows is None for u in self.units)

    def shards(self) -> int | None:
        """Output files the plan will write (None when some unit's rows are unknown)."""
        if self.unknown_units:
            return None
        return sum(-(-int(u.rows or 0) // self.shard_size) for u in self.units)


def _check_shard_size(shard_size: int) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be a positive integer, got {shard_size!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")


def _unit_key(options: dict[str, Any], unit: Unit, prefix: str | None = None) -> str:
    prefix = prefix if prefix is not None else json.dumps([UNIT_KEY_VERSION, options], sort_keys=True)
    return hashlib.sha256((prefix + json.dumps(_unit_line(unit), sort_keys=True)).encode()).hexdigest()


def _unit_line(u: Unit) -> list[Any]:
    line: list[Any] = [u.kind, u.source, u.stamp, u.start, u.stop, list(u.row_groups)]
    if u.items:
        line.append([[i.image_id, i.uri, i.stamp, i.error] for i in u.items])
    return line


def fingerprint_units(units: Sequence[Unit], header: dict[str, Any]) -> str:
    """Hex sha256 of ``header`` and every unit: kind, source, its size:mtime stamp, row range, row
    groups, and the ids, uris and stamps of inline inputs. Equal fingerprints mean the same units
    over the same (unchanged) files, so a resumed job can check it continues the plan it started."""
    digest = hashlib.sha256()
    # surrogateescape: a file name that is not UTF-8 is its own bytes (see pipeline.storage.names)
    digest.update(json.dumps({"version": PLAN_VERSION, **header}, sort_keys=True).encode())
    digest.update(b"\n")
    for u in units:
        digest.update(json.dumps(_unit_line(u), ensure_ascii=False).encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# What --input names
# --------------------------------------------------------------------------------------------


def _no_inputs(uri: str, remote_missing: bool = False) -> ConfigError:
    if remote_missing:
        return ConfigError(
            f"No images found under {uri}: nothing exists at that location "
            f"(looked for files with extensions {extensions_text()})"
        )
    return ConfigError(
        f"No images found under {uri} (looked recursively for files with extensions {extensions_text()}, "
        f"case-insensitive), nor WebDataset shards ({', '.join(TAR_EXTENSIONS)}) or manifests "
        f"({', '.join(sorted(MANIFEST_EXTENSIONS))})"
    )


def _kind_of_file(path: str, options: InputOptions) -> str | None:
    if options.format != "auto":
        return options.format
    if is_table_path(path):
        return "parquet" if options.image_column and path.lower().endswith(".parquet") else "manifest"
    if is_tar_path(path):
        return "webdataset"
    if is_image_path(path):
        return "images"
    return None


def _matches(kind: str, listed: ListedFile) -> bool:
    if kind == "images":
        return is_image_path(listed.rel or listed.path)
    if kind == "webdataset":
        return is_tar_path(listed.path)
    if kind == "parquet":
        return listed.path.lower().endswith(".parquet")
    return is_table_path(listed.path)


def _classify_folder(
    files: list[ListedFile], options: InputOptions, uri: str
) -> tuple[str, list[ListedFile]]:
    if options.format != "auto":
        kind = options.format
    elif options.image_column:
        kind = "parquet"
    elif any(is_image_path(f.rel) for f in files):
        kind = "images"  # a folder of images (as always), even if it holds a stray tar or csv
    elif any(is_tar_path(f.path) and f.reason is None for f in files):
        kind = "webdataset"
    elif any(is_table_path(f.path) and f.reason is None for f in files):
        kind = "manifest"
    else:
        raise _no_inputs(uri)
    chosen = [f for f in files if _matches(kind, f)]
    if not chosen:
        raise _no_inputs(uri)
    return kind, chosen


def _classify_pattern(files: list[ListedFile], options: InputOptions) -> tuple[str, list[ListedFile]]:
    if options.format != "auto":
        kind = options.format
        return kind, files if kind == "images" else [f for f in files if _matches(kind, f)]
    readable = [f for f in files if f.reason is None] or files
    if options.image_column and all(f.path.lower().endswith(".parquet") for f in readable):
        return "parquet", files
    if all(is_tar_path(f.path) for f in readable):
        return "webdataset", files
    if all(is_table_path(f.path) for f in readable):
        return "manifest", files
    return "images", files  # a glob lists exactly what it matches, whatever the names


def list_sources(
    input_uri: str, options: InputOptions, s3_endpoint: str | None
) -> tuple[str, str, list[ListedFile]]:
    """``(kind, scheme, files)``: what ``input_uri`` names, sorted by path."""
    if options.format not in INPUT_FORMATS:
        raise ConfigError(f"Unknown input format {options.format!r}; expected one of {list(INPUT_FORMATS)}")
    scheme, path = split_uri(input_uri)
    if has_glob(path) or has_braces(path):
        kind, files = _classify_pattern(list_pattern(scheme, path, input_uri, s3_endpoint), options)
        if not files:
            raise ConfigError(f"No {kind} inputs match {input_uri}")
        return kind, scheme, sort_listing(files)
    listed = stat_file(scheme, path, input_uri, s3_endpoint)
    if listed is None:
        if scheme == "local":
            raise ConfigError(f"Input path does not exist: {input_uri}")
        raise _no_inputs(input_uri, remote_missing=True)
    if listed.reason != "folder":
        kind = _kind_of_file(path, options)
        if kind is None:
            raise ConfigError(
                f"Input file {input_uri} is neither a manifest ({', '.join(sorted(MANIFEST_EXTENSIONS))}), "
                f"a WebDataset shard ({', '.join(TAR_EXTENSIONS)}) nor an image ({extensions_text()})"
            )
        if listed.reason is not None and kind != "images":
            raise InputReadError(f"Could not read {input_uri}: {listed.reason}")
        return kind, scheme, [listed]
    files = list_tree(scheme, path, input_uri, s3_endpoint, skip_hidden=True)
    kind, chosen = _classify_folder(files, options, input_uri)
    return kind, scheme, sort_listing(chosen)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def _check_options(kind: str, options: InputOptions, input_uri: str) -> None:
    if kind == "parquet" and not options.image_column:
        raise ConfigError("input.format parquet needs input.image_column (the column holding the images)")
    if options.image_column and kind != "parquet":
        raise ConfigError(
            f"input.image_column is set but {input_uri} holds {kind} inputs, not Parquet files of images"
        )
    if options.keep_columns and kind == "images":
        raise ConfigError(
            f"input.keep_columns needs inputs with columns (a manifest, Parquet files or WebDataset shards); "
            f"{input_uri} lists image files"
        )
    if options.id_column and kind in ("images", "webdataset"):
        raise ConfigError(
            f"input.id_column names a column of Parquet/CSV inputs; {input_uri} holds {kind} inputs"
        )


def plan_inputs(
    input_uri: str,
    *,
    options: InputOptions | None = None,
    shard_size: int = 256,
    limit: int | None = None,
    s3_endpoint: str | None = None,
    timeout_s: float | None = None,
) -> InputPlan:
    """The units of ``input_uri`` (see the module docstring), in a deterministic order.

    Raises ConfigError for a missing input, an empty result, a bad manifest (no ``uri`` column,
    empty or duplicate ids, a uri of an unknown scheme, text that is not UTF-8), an unusable
    column option, or ``limit`` with WebDataset shards (whose row counts the plan does not know);
    InputReadError when storage can't be listed.
    """
    _check_shard_size(shard_size)
    _check_limit(limit)
    options = options or InputOptions()
    kind, scheme, files = list_sources(input_uri, options, s3_endpoint)
    _check_options(kind, options, input_uri)
    keep = tuple(options.keep_columns)
    units: list[Unit] = []
    carried: dict[str, CarriedType] = {}
    if kind == "images":
        items = [
            InputItem(f.rel or posixpath.basename(f.path), format_uri(scheme, f.path), f.reason, f.stamp)
            for f in files
        ]
        if limit is not None:
            items = items[:limit]
        units = [
            Unit(index=i, kind="items", items=tuple(items[start : start + shard_size]))
            for i, start in enumerate(range(0, len(items), shard_size))
        ]
    elif kind == "webdataset":
        if limit is not None:
            raise ConfigError(
                "job.limit counts input rows, which a plan of WebDataset shards does not know before reading "
                "them; name fewer shards instead (e.g. shards/{00000..00009}.tar)"
            )
        units = [
            Unit(
                index=i,
                kind="webdataset",
                source=format_uri(scheme, f.path),
                name=f.rel or posixpath.basename(f.path),
                stamp=f.stamp,
            )
            for i, f in enumerate(files)
        ]
        carried = dict.fromkeys(keep, "string")
    else:
        checker = RowChecker(input_uri)
        budget = limit
        for f in files:
            if budget is not None and budget <= 0:
                break
            uri = format_uri(scheme, f.path)
            name = f.rel or posixpath.basename(f.path)
            if kind == "manifest":
                found = inspect_manifest(
                    uri,
                    name,
                    f.stamp,
                    checker,
                    id_column=options.id_column,
                    keep=keep,
                    timeout_s=timeout_s,
                    s3_endpoint=s3_endpoint,
                )
                new = manifest_units(found, len(units), shard_size, budget)
            else:
                assert options.image_column is not None
                found = inspect_image_file(  # type: ignore[assignment]
                    uri,
                    name,
                    f.stamp,
                    image_column=options.image_column,
                    id_column=options.id_column,
                    keep=keep,
                    timeout_s=timeout_s,
                    s3_endpoint=s3_endpoint,
                )
                new = image_units(found, len(units), shard_size, budget)  # type: ignore[arg-type]
            for column, typ in found.carried.items():
                if carried.setdefault(column, typ) != typ:
                    raise ConfigError(
                        f"Column {column!r} is {typ} in {uri} but {carried[column]} in an earlier file: "
                        "input.keep_columns needs one type per column"
                    )
            units.extend(new)
            if budget is not None:
                budget -= sum(u.rows or 0 for u in new)
        checker.finish()
        if not units:
            if len(files) == 1:
                raise ConfigError(f"Manifest {format_uri(scheme, files[0].path)} has no rows")
            raise ConfigError(f"The {kind} files of {input_uri} have no rows")
    carried = {c: carried.get(c, "string") for c in keep}
    sizes = [f.size for f in files]
    recorded = {
        "format": options.format,
        "image_column": options.image_column,
        "id_column": options.id_column,
        "keep_columns": list(keep),
    }
    header = {"kind": kind, "shard_size": shard_size, "limit": limit, "input": recorded}
    plan = InputPlan(
        input=absolute_uri(input_uri),
        kind=kind,
        units=units,
        shard_size=shard_size,
        files=len(files),
        source_bytes=sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None,
        carried=carried,
        options=recorded,
        fingerprint=fingerprint_units(units, header),
        header=header,
    )
    logger.info(
        "planned %s: %d %s file(s), %d unit(s), %s row(s)",
        input_uri,
        plan.files,
        kind,
        len(units),
        plan.rows if plan.rows is not None else f"{plan.known_rows}+",
    )
    return plan


# --------------------------------------------------------------------------------------------
# Expanding a unit (decode tasks)
# --------------------------------------------------------------------------------------------


def _chunks(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _read_chunk(chunk: list[Sample], read: ReadOptions) -> list[Sample]:
    todo = [s for s in chunk if s.data is None and s.error is None]
    datas = read_bytes(
        [s.uri for s in todo],
        s3_endpoint=read.s3_endpoint,
        threads=read.threads,
        max_bytes=read.max_bytes,
        timeout_s=read.timeout_s,
    )
    for sample, data in zip(todo, datas, strict=True):
        if isinstance(data, InputReadError):
            sample.error = data
        else:
            sample.data = data
    return chunk


def _unit_samples(unit: Unit, read: ReadOptions) -> Iterator[Sample]:
    keep = read.keep_columns
    if unit.kind == "items":
        columns = dict(unit.columns)
        for row, item in enumerate(unit.items):
            error = InputReadError(f"Could not read {item.uri}: {item.error}") if item.error else None
            yield Sample(item.image_id, item.uri, error=error, carried={c: columns[c][row] for c in columns})
    elif unit.kind == "manifest":
        yield from manifest_samples(
            unit, id_column=read.id_column, keep=keep, timeout_s=read.timeout_s, s3_endpoint=read.s3_endpoint
        )
    elif unit.kind == "webdataset":
        yield from tar_samples(
            unit, keep=keep, max_bytes=read.max_bytes, timeout_s=read.timeout_s, s3_endpoint=read.s3_endpoint
        )
    elif unit.kind == "parquet":
        assert read.image_column is not None
        yield from image_samples(
            unit,
            image_column=read.image_column,
            id_column=read.id_column,
            keep=keep,
            max_bytes=read.max_bytes,
            timeout_s=read.timeout_s,
            s3_endpoint=read.s3_endpoint,
        )
    else:  # pragma: no cover - guarded by UnitKind
        raise ConfigError(f"Unknown unit kind {unit.kind!r}")


def _guarded(unit: Unit, samples: Iterator[Sample], keep: Sequence[str]) -> Iterator[Sample]:
    """``samples``; if reading the unit's source fails part-way, one error row per row it still owes
    (units of known size) or one error row for the rest (a tar), so that a unit never fails its
    task and every input row gets exactly one output row."""
    done = 0
    try:
        for sample in samples:
            done += 1
            yield sample
    except Exception as exc:
        if isinstance(exc, InputReadError):
            error = exc
        else:
            code = (
                ErrorCode.READ_FAILED
                if isinstance(exc, OSError | ConfigError | pa.ArrowException)
                else ErrorCode.INTERNAL
            )
            if code == ErrorCode.INTERNAL:
                logger.exception("unexpected failure reading %s", unit.source)
            error = InputReadError(f"Could not read {unit.source}: {type(exc).__name__}: {exc}", code=code)
        if unit.rows is None:
            yield Sample(f"{unit.name}@sample-{done}", unit.source, error=error, carried=dict.fromkeys(keep))
            return
        for row in range(unit.start + done, unit.start + unit.rows):
            yield Sample(
                f"{unit.name}#{row}", f"{unit.source}#{row}", error=error, carried=dict.fromkeys(keep)
            )


def expand_unit(unit: Unit, shard_size: int, read: ReadOptions) -> Iterator[list[Sample]]:
    """The samples of ``unit`` in order, ``shard_size`` at a time, each with its bytes or its error."""
    _check_shard_size(shard_size)
    for chunk in _chunks(_guarded(unit, _unit_samples(unit, read), read.keep_columns), shard_size):
        yield _read_chunk(chunk, read)


# --------------------------------------------------------------------------------------------
# Individual image inputs (the listing of the job before units)
# --------------------------------------------------------------------------------------------


def list_inputs(
    input_uri: str, *, s3_endpoint: str | None = None, limit: int | None = None
) -> list[InputItem]:
    """Every image input of ``input_uri`` (a folder/prefix, glob, single image or manifest), in order.

    Listings are sorted by uri and ``image_id`` is the path relative to the listing root (the
    glob's folder before its first wildcard; the file name for a single file). Manifests keep
    their row order; ``image_id`` is the ``image_id`` column, else the ``uri`` as written.
    ``limit`` keeps the first N. Raises ConfigError for a missing path, an empty result, a bad
    manifest (no ``uri`` column, empty or duplicate ids) or a bad limit (and for WebDataset or
    Parquet image inputs: their images are listed by :func:`plan_inputs` and :func:`expand_unit`),
    and InputReadError when storage can't be listed.
    """
    plan = plan_inputs(input_uri, shard_size=1 << 30, limit=limit, s3_endpoint=s3_endpoint)
    if plan.kind not in ("images", "manifest"):
        raise ConfigError(f"{input_uri} holds {plan.kind} inputs: list them with plan_inputs")
    items: list[InputItem] = []
    for unit in plan.units:
        if unit.kind == "items":
            items.extend(unit.items)
        else:
            samples = manifest_samples(unit, id_column=None, keep=(), timeout_s=None, s3_endpoint=s3_endpoint)
            items.extend(InputItem(s.image_id, s.uri) for s in samples)
    logger.info("listed %d input(s) from %s", len(items), input_uri)
    return items


@dataclass(frozen=True)
class Shard:
    """A contiguous chunk of an input list."""

    index: int
    items: tuple[InputItem, ...]


def plan_shards(items: Sequence[InputItem], shard_size: int) -> list[Shard]:
    """``items`` cut into contiguous shards of ``shard_size`` (the last may be shorter), in order."""
    _check_shard_size(shard_size)
    return [
        Shard(index=index, items=tuple(items[start : start + shard_size]))
        for index, start in enumerate(range(0, len(items), shard_size))
    ]


def plan_fingerprint(items: Sequence[InputItem], shard_size: int) -> str:
    """Hex sha256 of the ordered ``(image_id, uri)`` list and ``shard_size``.

    Equal fingerprints mean :func:`plan_shards` gives the same shards.
    """
    _check_shard_size(shard_size)
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": _LEGACY_PLAN_VERSION, "shard_size": shard_size}).encode())
    digest.update(b"\n")
    for item in items:
        digest.update(json.dumps([item.image_id, item.uri], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()
