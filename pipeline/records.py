"""The typed contracts of the offline job's Ray hops: decoded files to the encoders, summaries back.

The decode stage (CPU tasks) expands a unit of the plan into output files of ``job.shard_size``
inputs each and turns each file's inputs into a :class:`DecodedShard`; the encode stage (the job's
actor pool, or the replicas of a Serve application) reads it back, encodes it, writes the data file
through the table (:class:`~pipeline.table.WriteTarget`) and returns a :class:`ShardSummary`, which the
driver's committer turns into the file's add action. Across a hop each record is one Ray Data row of
natural columns (``to_row`` / ``from_row``): scalars, per-input lists of strings (Arrow
``list<string>``), per-input numeric arrays, and the uint8 pixels of the ok inputs as a tensor column
``(tiles, 3, H, W)`` — no JSON strings, no raw blobs with hidden shapes.

When the encoder decodes on its own device (``decode.nvjpeg``), the decode stage only reads: the
record carries each readable input's encoded bytes (``data``) instead of pixels.

Carried columns (``input.keep_columns``) travel as one per-input list each, under the key
``carried.<column>`` (text, numbers, booleans or None).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .model.errors import LlavaFeaturesError
from .storage import CARRIED_PREFIX
from .table import Committer, DataFile, InputRows, WriteTarget

__all__ = [
    "DecodedShard",
    "PoolInfo",
    "ShardSummary",
    "ShardTarget",
    "rows_of_batch",
    "rows_to_batch",
]

_STRING_COLUMNS = ("image_id", "uri", "error_code", "error_message")
_NUMERIC_COLUMNS = {"ok": np.bool_, "width": np.int32, "height": np.int32}
_TILE_COLUMNS = ("tiles", "grid_rows", "grid_cols")


@dataclass
class DecodedShard:
    """One output file after the decode stage: its inputs (the table's row model) and the ok inputs' pixels."""

    shard: int
    """Index of the unit of the plan the inputs belong to."""
    key: str = ""
    """That unit's content key (its data files are named by it)."""
    piece: int = 0
    """Position of this output file within its unit."""
    last: bool = True
    """Whether this is the unit's last output file (the unit is committed once all of them are)."""
    rows: InputRows = field(default_factory=InputRows)
    """Each input's id, uri, status, size, error and carried values, in input order."""
    tiles: list[int] = field(default_factory=list)
    """How many of ``pixels``' tiles each input has (1; anyres: 1 + its grid; 0 for errors)."""
    grid_rows: list[int] = field(default_factory=list)
    """anyres: rows of each input's tile grid (0 otherwise)."""
    grid_cols: list[int] = field(default_factory=list)
    """anyres: columns of each input's tile grid (0 otherwise)."""
    pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 1, 1), np.uint8))
    """(tiles of the ok inputs, 3, H, W) uint8 pixels, in input order (one tile per input but for anyres)."""
    data: list[bytes] | None = None
    """The ok inputs' encoded bytes, when the encoder decodes them itself (then ``pixels`` is empty)."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_ok(self) -> int:
        return self.rows.num_ok

    @property
    def num_tiles(self) -> int:
        """Rows of ``pixels``: the ok inputs' tiles."""
        return int(sum(t for t, ok in zip(self.tiles, self.rows.ok, strict=True) if ok))

    def add_ok(
        self,
        image_id: str,
        uri: str,
        *,
        width: int = 0,
        height: int = 0,
        carried: Mapping[str, Any] | None = None,
        tiles: int = 1,
        grid: tuple[int, int] = (0, 0),
    ) -> None:
        self.rows.add_ok(image_id, uri, width=width, height=height, carried=carried)
        self._add_tiles(tiles, grid)

    def add_error(
        self, image_id: str, uri: str, *, code: str, message: str, carried: Mapping[str, Any] | None = None
    ) -> None:
        self.rows.add_error(image_id, uri, code=code, message=message, carried=carried)
        self._add_tiles(0, (0, 0))

    def _add_tiles(self, tiles: int, grid: tuple[int, int]) -> None:
        self.tiles.append(int(tiles))
        self.grid_rows.append(int(grid[0]))
        self.grid_cols.append(int(grid[1]))

    def validate(self) -> None:
        """Raise ``ValueError`` unless the columns line up and the pixels match the ok inputs."""
        self.rows.validate()
        n = len(self.rows)
        for name in _TILE_COLUMNS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"DecodedShard.{name} has {len(getattr(self, name))} entries for {n} inputs")
        if self.data is not None:
            if len(self.data) != self.num_ok:
                raise ValueError(f"DecodedShard.data has {len(self.data)} inputs for {self.num_ok} ok inputs")
        elif self.pixels.ndim != 4 or self.pixels.shape[0] != self.num_tiles or self.pixels.dtype != np.uint8:
            raise ValueError(
                f"DecodedShard.pixels must be uint8 (tiles of the ok inputs, 3, H, W) with {self.num_tiles} rows, got "
                f"{self.pixels.dtype} {self.pixels.shape}"
            )

    # -- across the Ray Data hop ---------------------------------------------------------------

    def to_row(self) -> dict[str, Any]:
        """The record as one Ray Data row (per-row values; see :func:`rows_to_batch`)."""
        self.validate()
        rows = self.rows
        row: dict[str, Any] = {
            "shard": int(self.shard),
            "key": self.key,
            "piece": int(self.piece),
            "last": bool(self.last),
        }
        row.update({name: list(getattr(rows, name)) for name in _STRING_COLUMNS})
        row.update({name: np.asarray(getattr(rows, name), dtype) for name, dtype in _NUMERIC_COLUMNS.items()})
        row.update({name: np.asarray(getattr(self, name), np.int32) for name in _TILE_COLUMNS})
        row["pixels"] = np.ascontiguousarray(self.pixels)
        row["device_decode"] = self.data is not None  # a null column would not survive the hop as None
        row["data"] = list(self.data) if self.data is not None else []
        row.update({CARRIED_PREFIX + name: list(values) for name, values in rows.carried.items()})
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DecodedShard:
        """The record of a row written by :meth:`to_row` (as Ray Data hands it back)."""
        data = row["data"] if bool(row["device_decode"]) else None
        rows = InputRows(
            **{name: [_text(v) for v in row[name]] for name in _STRING_COLUMNS},
            # small per-input columns: owned Python values (Ray hands out read-only views); pixels stay views
            ok=[bool(v) for v in np.asarray(row["ok"]).reshape(-1)],
            width=[int(v) for v in np.asarray(row["width"]).reshape(-1)],
            height=[int(v) for v in np.asarray(row["height"]).reshape(-1)],
            carried={
                key[len(CARRIED_PREFIX) :]: [_plain(v) for v in values]
                for key, values in row.items()
                if key.startswith(CARRIED_PREFIX)
            },
        )
        for name in ("image_id", "uri"):
            setattr(rows, name, [str(v) for v in getattr(rows, name)])
        record = cls(
            shard=int(row["shard"]),
            key=str(row.get("key", "")),
            piece=int(row.get("piece", 0)),
            last=bool(row.get("last", True)),
            rows=rows,
            **{name: [int(v) for v in np.asarray(row[name]).reshape(-1)] for name in _TILE_COLUMNS},
            pixels=np.asarray(row["pixels"], np.uint8),
            data=[bytes(d) for d in data] if data is not None else None,
        )
        record.validate()
        return record


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class ShardSummary:
    """What the encode stage returns for one output file: where it wrote it and what it holds."""

    shard: int
    """The unit."""
    piece: int
    last: bool
    rows: int
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    """Error rows by code."""
    file: DataFile | None = None
    """The data file written (its add action's values)."""
    fault_code: str = ""
    """Set when the file could not be written (a stable error code: ``output_write_failed``, the shared
    pool's ``unavailable``): the job stops, saying ``fault``, instead of a worker raising."""
    fault: str = ""
    """What went wrong, one line."""

    @classmethod
    def failed(cls, record: DecodedShard, error: LlavaFeaturesError) -> ShardSummary:
        """The summary of ``record``'s file that could not be written (``error``: a typed fault)."""
        return cls(
            shard=record.shard,
            piece=record.piece,
            last=record.last,
            rows=len(record),
            ok=0,
            fault_code=str(error.code),
            fault=error.message,
        )

    def to_row(self) -> dict[str, Any]:
        codes = sorted(self.errors)
        row: dict[str, Any] = {
            "shard": self.shard,
            "piece": self.piece,
            "last": self.last,
            "rows": self.rows,
            "ok": self.ok,
            "codes": codes,
            "counts": [self.errors[c] for c in codes],
            "fault_code": self.fault_code,
            "fault": self.fault,
        }
        row.update(self.file.to_row() if self.file is not None else DataFile.empty_row())
        return row

    def commit_to(self, committer: Committer) -> bool:
        """Hand this file to the table's committer of the run; True when it is new (a retried file
        reports again: it was rewritten under the same name, not duplicated)."""
        return committer.add(
            unit=self.shard,
            piece=self.piece,
            last=self.last,
            file=self.file,
            rows=self.rows,
            ok=self.ok,
            errors=self.errors,
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ShardSummary:
        return cls(
            shard=int(row["shard"]),
            piece=int(row["piece"]),
            last=bool(row["last"]),
            rows=int(row["rows"]),
            ok=int(row["ok"]),
            errors={str(c): int(n) for c, n in zip(row["codes"], row["counts"], strict=True)},
            file=DataFile.from_row(row),
            fault_code=str(row.get("fault_code") or ""),
            fault=str(row.get("fault") or ""),
        )


@dataclass(frozen=True)
class ShardTarget:
    """What an encoder needs to turn a job's decoded files into data files of its table: the features
    the job asks for, and where and how the files are written (:class:`~pipeline.table.WriteTarget`).
    An encoder outside the job (a Serve replica of the shared pool) writes the job's files with it exactly
    as the job's own actors do."""

    fingerprint: str
    """The job's encoder fingerprint: a replica with another one refuses the shard."""
    features: str
    """``encoder.features`` of the job (projected, tower or both)."""
    pooled: bool
    """``encoder.pooled`` of the job."""
    table: WriteTarget
    """The run's write target (table location, schema, segment, run, compression)."""


@dataclass(frozen=True)
class PoolInfo:
    """What a Serve application of the shared pool tells an offline job before it sends shards."""

    fingerprint: str
    """The replicas' encoder fingerprint."""
    offline_chunk_size: int
    """``serve.offline_chunk_size``: images (anyres: tiles) per offline forward pass."""
    max_offline_shards: int
    """``serve.max_offline_shards``: offline shards in flight per replica."""
    max_replicas: int
    """``serve.max_replicas``."""
    replica: str = ""
    """The replica that answered."""


def _plain(value: Any) -> Any:
    """A value as plain Python (Ray Data hands numbers back as numpy scalars)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def rows_to_batch(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """A numpy batch (``batch_format="numpy"``) of rows: each column an array with one entry per row
    (lists as object entries, which Arrow stores as ``list<...>``; arrays stacked when they share a shape,
    else object entries, which Ray Data stores as variable-shaped tensors)."""
    batch: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if isinstance(values[0], np.ndarray) and all(v.shape == values[0].shape for v in values):
            batch[name] = np.stack(values)
        elif isinstance(values[0], int | np.integer):
            batch[name] = np.asarray(values, dtype=np.int64)
        else:
            column = np.empty(len(values), dtype=object)
            for i, value in enumerate(values):  # element by element: numpy would broadcast lists
                column[i] = value
            batch[name] = column
    return batch


def rows_of_batch(batch: Mapping[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """The rows of a numpy batch, each a ``{column: value}`` mapping."""
    n = len(next(iter(batch.values())))
    for i in range(n):
        yield {name: column[i] for name, column in batch.items()}
