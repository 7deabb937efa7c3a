"""The plan's vocabulary: input units, the inputs they hold, and the samples decode tasks expand them into.

A :class:`Unit` is what the driver plans and what resumes: a group of listed files (or of CSV
manifest rows), a row range of a Parquet manifest, one WebDataset tar, or a range of row groups of
a Parquet file of images. It is small whatever it holds (a tar of 10,000 images is one path), so
the plan of a job costs memory in proportion to its units, not to its images. Decode tasks expand
a unit into :class:`Sample` s, ``job.shard_size`` at a time (one output file each).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..model.errors import ConfigError, InputReadError
from .names import from_hop, to_hop

UnitKind = Literal["items", "manifest", "webdataset", "parquet"]
"""``items``: inputs listed one by one (files of a folder/glob, rows of a CSV manifest), carried in
the unit; ``manifest``: a row range of a Parquet manifest; ``webdataset``: one tar; ``parquet``: row
groups of a Parquet file holding the images."""
UNIT_KINDS: tuple[str, ...] = get_args(UnitKind)

CARRIED_PREFIX = "carried."
"""Row keys of carried (``input.keep_columns``) values across the Ray hop: ``carried.<column>``."""


@dataclass(frozen=True)
class InputItem:
    """One input image: its stable id (the output key) and the URI its bytes are read from."""

    image_id: str
    uri: str
    error: str | None = None
    """Why it cannot be read, found while listing (a dangling link, a FIFO, ...): it gets an error row."""
    stamp: str = field(default="", compare=False)
    """``size:mtime_ns`` of the file when listed (part of the plan fingerprint)."""


@dataclass(frozen=True)
class Unit:
    """One unit of the plan: what a decode task expands and what a commit record covers."""

    index: int
    """Position in the plan; output files are ``part-<index>-<piece>.parquet``."""
    kind: UnitKind
    source: str = ""
    """URI of the file the unit reads (manifest, tar, Parquet); empty for ``items``."""
    name: str = ""
    """That file's path relative to the input root (ids of rows that have none)."""
    stamp: str = ""
    """``size:mtime_ns`` of the source when planned."""
    start: int = 0
    """First row of the unit in its file (manifests, Parquet)."""
    stop: int | None = None
    """End row (exclusive); None when not known before reading (a tar)."""
    row_groups: tuple[int, ...] = ()
    """The Parquet row groups that hold rows ``start..stop``."""
    items: tuple[InputItem, ...] = ()
    """The inputs of an ``items`` unit."""
    columns: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    """Carried values of an ``items`` unit's inputs (CSV manifests), one tuple per column."""

    @property
    def rows(self) -> int | None:
        """Input rows of the unit; None when only reading the source tells (tars)."""
        if self.kind == "items":
            return len(self.items)
        return None if self.stop is None else self.stop - self.start

    def to_row(self) -> dict[str, Any]:
        """The unit as one Ray Data row of natural columns (see :meth:`from_row`)."""
        row: dict[str, Any] = {
            "unit": self.index,
            "kind": self.kind,
            # Names that are not UTF-8 (POSIX file names are bytes) cross the hop losslessly.
            "source": to_hop(self.source),
            "name": to_hop(self.name),
            "start": self.start,
            "stop": -1 if self.stop is None else self.stop,
            "row_groups": list(self.row_groups),
            "image_id": [to_hop(i.image_id) for i in self.items],
            "uri": [to_hop(i.uri) for i in self.items],
            "error": [to_hop(i.error or "") for i in self.items],
        }
        for name, values in self.columns:
            row[CARRIED_PREFIX + name] = list(values)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Unit:
        """The unit of a row written by :meth:`to_row` (as Ray Data hands it back)."""
        items = tuple(
            InputItem(from_hop(str(i)), from_hop(str(u)), from_hop(str(e)) or None)
            for i, u, e in zip(row["image_id"], row["uri"], row["error"], strict=True)
        )
        columns = tuple(
            (key[len(CARRIED_PREFIX) :], tuple(_plain(v) for v in values))
            for key, values in row.items()
            if key.startswith(CARRIED_PREFIX) and values is not None and len(values) == len(items)
        )  # units of other kinds in the same block have no values (None or empty): they read their own
        stop = int(row["stop"])
        return cls(
            index=int(row["unit"]),
            kind=str(row["kind"]),  # type: ignore[arg-type]
            source=from_hop(str(row["source"])),
            name=from_hop(str(row["name"])),
            start=int(row["start"]),
            stop=None if stop < 0 else stop,
            row_groups=tuple(int(g) for g in row["row_groups"]),
            items=items,
            columns=columns,
        )


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (Ray Data hands numbers back as numpy types)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str | bytes) else value


@dataclass
class Sample:
    """One input as a decode task sees it: its id and uri, its bytes or why there are none, carried values."""

    image_id: str
    uri: str
    data: bytes | None = None
    """The encoded image (None until read, or when ``error`` is set)."""
    error: InputReadError | None = None
    """Why the input has no bytes (an error row)."""
    carried: dict[str, Any] = field(default_factory=dict)
    """``input.keep_columns`` values of this input (missing ones are None)."""


CarriedType = Literal["string", "int64", "float64", "bool"]
"""Arrow types of carried columns in the output (every output file of a job has the same schema)."""


def carried_type(arrow_type: Any) -> CarriedType | None:
    """The carried type of a Parquet column of ``arrow_type`` (None: not a column that can be carried)."""
    import pyarrow as pa

    t = arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int64"
    if pa.types.is_floating(t):
        return "float64"
    return None


def carried_types(schema: Any, keep: Sequence[str], where: str) -> dict[str, CarriedType]:
    """The carried type of each ``keep`` column of the Arrow ``schema`` (columns known to be there).
    Raises ConfigError, prefixed with ``where`` (the file), for a column that cannot be carried."""
    carried: dict[str, CarriedType] = {}
    for column in keep:
        kind = carried_type(schema.field(column).type)
        if kind is None:
            raise ConfigError(
                f"{where}: column {column!r} is {schema.field(column).type}; input.keep_columns carries "
                "text, number and boolean columns"
            )
        carried[column] = kind
    return carried
