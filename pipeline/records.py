"""The typed contract of the offline job's Ray Data hop: one :class:`DecodedShard` per output file.

The decode stage (CPU tasks) expands a unit of the plan into output files of ``job.shard_size``
inputs each and turns each file's inputs into a :class:`DecodedShard`; the encode stage (the
actor pool) reads it back. Across the hop it is one Ray Data row of natural columns
(:meth:`DecodedShard.to_row` / :meth:`DecodedShard.from_row`): scalars, per-input lists of
strings (Arrow ``list<string>``), per-input numeric arrays and the uint8 pixels of the ok inputs
as a tensor column ``(n_ok, 3, H, W)`` — no JSON strings, no raw blobs with hidden shapes.

When the encoder decodes on its own device (``decode.nvjpeg``), the decode stage only reads:
the record carries each readable input's encoded bytes (``data``) instead of pixels.

Carried columns (``input.keep_columns``) travel as one per-input list each, under the key
``carried.<column>`` (text, numbers, booleans or None).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constants import STATUS_ERROR, STATUS_OK
from .storage import CARRIED_PREFIX

__all__ = [
    "DecodedShard",
    "PoolInfo",
    "RaggedRows",
    "ShardSummary",
    "ShardTarget",
    "rows_of_batch",
    "rows_to_batch",
]

_STRING_COLUMNS = ("image_id", "uri", "error_code", "error_message")
_NUMERIC_COLUMNS = {
    "ok": np.bool_,
    "width": np.int32,
    "height": np.int32,
    "tiles": np.int32,
    "grid_rows": np.int32,
    "grid_cols": np.int32,
}


@dataclass
class DecodedShard:
    """One shard after the decode stage: per-input metadata in input order, and the ok inputs' pixels."""

    shard: int
    """Index of the unit of the plan the inputs belong to."""
    piece: int = 0
    """Position of this output file within its unit (its file is ``part-<shard>-<piece>.parquet``)."""
    last: bool = True
    """Whether this is the unit's last output file (the unit is committed once all of them are)."""
    image_id: list[str] = field(default_factory=list)
    """Each input's id."""
    uri: list[str] = field(default_factory=list)
    """Where each input was read from."""
    ok: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))
    """(n,) True where the input was decoded (or, with ``data``, read)."""
    width: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """(n,) width of each decoded image (0 where unknown)."""
    height: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """(n,) height of each decoded image (0 where unknown)."""
    tiles: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """(n,) how many of ``pixels``' tiles each input has (1; anyres: 1 + its grid; 0 for errors)."""
    grid_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """(n,) anyres: rows of each input's tile grid (0 otherwise)."""
    grid_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    """(n,) anyres: columns of each input's tile grid (0 otherwise)."""
    error_code: list[str] = field(default_factory=list)
    """Each failed input's stable error code ("" where ok)."""
    error_message: list[str] = field(default_factory=list)
    """Each failed input's reason ("" where ok)."""
    pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 1, 1), np.uint8))
    """(tiles of the ok inputs, 3, H, W) uint8 pixels, in input order (one tile per input but for anyres)."""
    data: list[bytes] | None = None
    """The ok inputs' encoded bytes, when the encoder decodes them itself (then ``pixels`` is empty)."""
    carried: dict[str, list[Any]] = field(default_factory=dict)
    """Carried columns: ``{column: one value per input}`` (None where an input has none)."""

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def num_ok(self) -> int:
        return int(self.ok.sum())

    @property
    def num_tiles(self) -> int:
        """Rows of ``pixels``: the ok inputs' tiles."""
        return int(self.tiles[self.ok].sum())

    def add_ok(
        self,
        image_id: str,
        uri: str,
        width: int = 0,
        height: int = 0,
        carried: Mapping[str, Any] | None = None,
        *,
        tiles: int = 1,
        grid: tuple[int, int] = (0, 0),
    ) -> None:
        self._add(image_id, uri, True, (width, height, tiles, *grid), "", "", carried)

    def add_error(
        self, image_id: str, uri: str, code: str, message: str, carried: Mapping[str, Any] | None = None
    ) -> None:
        self._add(image_id, uri, False, (0, 0, 0, 0, 0), str(code), message, carried)

    def _add(
        self,
        image_id: str,
        uri: str,
        ok: bool,
        numbers: tuple[int, ...],
        code: str,
        message: str,
        carried: Mapping[str, Any] | None,
    ) -> None:
        n = len(self.image_id)
        for name, value in (carried or {}).items():
            self.carried.setdefault(name, [None] * n).append(value)
        for values in self.carried.values():  # a column this input has no value for
            if len(values) == n:
                values.append(None)
        self.image_id.append(image_id)
        self.uri.append(uri)
        self.ok = np.append(self.ok, ok)
        for name, value in zip(("width", "height", "tiles", "grid_rows", "grid_cols"), numbers, strict=True):
            setattr(self, name, np.append(getattr(self, name), np.int32(value)).astype(np.int32))
        self.error_code.append(code)
        self.error_message.append(message)

    def statuses(self) -> list[str]:
        return [STATUS_OK if ok else STATUS_ERROR for ok in self.ok]

    def validate(self) -> None:
        """Raise ``ValueError`` unless the columns line up and the pixels match the ok inputs."""
        n = len(self.image_id)
        for name in ("uri", "error_code", "error_message", *_NUMERIC_COLUMNS):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"DecodedShard.{name} has {len(getattr(self, name))} entries, image_id has {n}"
                )
        for name, values in self.carried.items():
            if len(values) != n:
                raise ValueError(
                    f"DecodedShard carried column {name!r} has {len(values)} entries, image_id has {n}"
                )
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
        row: dict[str, Any] = {"shard": int(self.shard), "piece": int(self.piece), "last": bool(self.last)}
        row.update({name: list(getattr(self, name)) for name in _STRING_COLUMNS})
        row.update({name: np.asarray(getattr(self, name), dtype) for name, dtype in _NUMERIC_COLUMNS.items()})
        row["pixels"] = np.ascontiguousarray(self.pixels)
        row["device_decode"] = self.data is not None  # a null column would not survive the hop as None
        row["data"] = list(self.data) if self.data is not None else []
        row.update({CARRIED_PREFIX + name: list(values) for name, values in self.carried.items()})
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DecodedShard:
        """The record of a row written by :meth:`to_row` (as Ray Data hands it back)."""
        data = row["data"] if bool(row["device_decode"]) else None
        record = cls(
            shard=int(row["shard"]),
            piece=int(row.get("piece", 0)),
            last=bool(row.get("last", True)),
            **{name: [str(v) for v in row[name]] for name in _STRING_COLUMNS},
            # small per-input columns: owned copies (Ray hands out read-only views); the pixels stay views
            **{name: np.array(row[name], dtype).reshape(-1) for name, dtype in _NUMERIC_COLUMNS.items()},
            pixels=np.asarray(row["pixels"], np.uint8),
            data=[bytes(d) for d in data] if data is not None else None,
            carried={
                key[len(CARRIED_PREFIX) :]: [_plain(v) for v in values]
                for key, values in row.items()
                if key.startswith(CARRIED_PREFIX)
            },
        )
        record.validate()
        return record


@dataclass(frozen=True)
class ShardSummary:
    """What committing one output file gives back to the job's driver (never tensors): the file's
    name ("" for a unit without rows) and its row counts; the driver turns a unit's summaries into
    its commit record."""

    shard: int
    """The unit the file belongs to."""
    piece: int
    """The file's position within its unit."""
    last: bool
    """Whether it is the unit's last file."""
    rows: int
    """Input rows in the file."""
    ok: int
    """Rows with status ok."""
    file: str
    """The file's name in the output ("" when the unit has no rows)."""
    errors: dict[str, int] = field(default_factory=dict)
    """Error rows by error code."""

    def to_row(self) -> dict[str, Any]:
        """One Ray Data row (error codes and counts as two parallel lists)."""
        codes = sorted(self.errors)
        return {
            "shard": self.shard,
            "piece": self.piece,
            "last": self.last,
            "rows": self.rows,
            "ok": self.ok,
            "file": self.file,
            "codes": codes,
            "counts": [self.errors[c] for c in codes],
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ShardSummary:
        return cls(
            shard=int(row["shard"]),
            piece=int(row["piece"]),
            last=bool(row["last"]),
            rows=int(row["rows"]),
            ok=int(row["ok"]),
            file=str(row["file"]),
            errors={str(c): int(n) for c, n in zip(row["codes"], row["counts"], strict=True)},
        )


@dataclass(frozen=True)
class ShardTarget:
    """Where and how a job's output files are written, and what they hold: what an encoder outside
    the job (a Serve replica of the shared pool) needs to commit the job's files exactly as the job's
    own actors do."""

    output: str
    """The output location (local paths absolute)."""
    fingerprint: str
    """The job's encoder fingerprint: a replica with another one refuses the shard."""
    metadata: dict[str, str]
    """Key-value metadata of every file (fingerprint, config and encoder description)."""
    features: str
    """``encoder.features`` of the job (projected, tower or both)."""
    pooled: bool
    """``encoder.pooled`` of the job."""
    tensor_format: str
    """``job.tensor_format``."""
    compression: str
    """``job.compression``."""
    s3_endpoint: str | None = None
    """``job.s3_endpoint``."""
    carried_types: dict[str, str] = field(default_factory=dict)
    """Arrow types of the carried columns (``input.keep_columns``)."""


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


@dataclass
class RaggedRows:
    """Rows of different shapes held in one array: row ``i`` is ``data[offsets[i]:offsets[i+1]]``, of shape
    ``(offsets[i+1] - offsets[i], *data.shape[1:])`` — LLaVA-NeXT's features (tiles ``[1 + n, tokens,
    dim]``, packed ``[tokens, dim]``), which vary in their first dimension from image to image."""

    data: np.ndarray
    """The rows concatenated along their first dimension."""
    offsets: np.ndarray
    """(rows + 1,) int64 start of each row in ``data``, then its length."""

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if (
            self.offsets.ndim != 1
            or self.offsets.size < 1
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.data)
        ):
            raise ValueError(f"offsets {self.offsets.tolist()} do not cover {len(self.data)} values")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"offsets {self.offsets.tolist()} decrease")

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray], like: np.ndarray | None = None) -> RaggedRows:
        """Concatenate ``rows`` (all of one dtype and trailing shape; ``like`` gives them when there is none)."""
        if not rows:
            assert like is not None, "an empty RaggedRows needs a `like` array for its dtype and shape"
            return cls(np.zeros((0, *like.shape[1:]), like.dtype), np.zeros(1, np.int64))
        lengths = [len(r) for r in rows]
        return cls(
            np.concatenate(rows) if len(rows) > 1 else rows[0], np.concatenate([[0], np.cumsum(lengths)])
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.data[self.offsets[index] : self.offsets[index + 1]]

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """The shape every row shares after its first dimension."""
        return tuple(self.data.shape[1:])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
