"""A decoded shard → a data file of the feature table: the encode + write stage of the offline job.

One owner for both pools that run it: the job's own actor pool (:class:`pipeline.offline.actors.EncodeShardActor`)
and the encoder replicas of a Serve application (``llava-features encode --serve-app``, the pool
shared with the endpoint). :class:`ShardWriter` encodes a :class:`~pipeline.records.DecodedShard`'s
ok inputs with a :class:`~pipeline.encoder.FeatureEncoder` — in one call, or in chunks of a few images
that the caller runs one at a time on its device (:meth:`ShardWriter.chunks`: a Serve replica runs
online batches between them) — builds the file's columns (:func:`pipeline.table.build_batch`), writes
it under its final name (:meth:`pipeline.table.WriteTarget.write`: temporary name + rename locally,
final-name PUT on object stores, so a retried file replaces the earlier attempt's), and returns the
small :class:`~pipeline.records.ShardSummary` the job's driver commits to the table's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .config import Config, config_to_dict
from .model.errors import ConfigError, DecodeError, ErrorCode
from .records import DecodedShard, ShardSummary, ShardTarget
from .table import TableIdentity, TableSpec, TensorSpec

if TYPE_CHECKING:
    from .encoder import EncodedBatch, EncoderDescription, FeatureEncoder
    from .model import ResolvedModel

logger = logging.getLogger(__name__)

__all__ = [
    "ShardWriter",
    "check_fingerprint",
    "chunk_ranges",
    "schema_options",
    "table_identity",
    "table_spec",
]

Chunk = Callable[[], "EncodedBatch"]
"""One piece of a shard's device work: runs on the caller's device thread, returns its rows."""


def chunk_ranges(sizes: np.ndarray, limit: int | None) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` ranges of items whose ``sizes`` (tiles per image) add up to at most
    ``limit`` each (an item larger than ``limit`` alone); one range of all when ``limit`` is None."""
    n = len(sizes)
    if n == 0:
        return []
    if limit is None:
        return [(0, n)]
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > start and total + size > limit:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    ranges.append((start, n))
    return ranges


def table_spec(config: Config, resolved: ResolvedModel, carried: dict[str, str] | None = None) -> TableSpec:
    """The columns of the table ``config`` writes with ``resolved`` (``carried``: the plan's carried
    column types): what the encoder returns, as the table stores it."""
    from .encoder import output_dtype_name

    dtype = output_dtype_name(config)
    anyres = config.encoder.anyres_output if resolved.anyres else None
    kind = config.encoder.features
    dims = {"features": resolved.feature_dim, "tower_features": resolved.mm_hidden_size}
    wanted = [n for n, k in (("features", "projected"), ("tower_features", "tower")) if kind in (k, "both")]

    def shape(dim: int) -> tuple[int | None, ...]:
        if anyres == "packed":
            return (None, dim)
        if anyres == "tiles":
            return (None, resolved.num_tokens, dim)
        return (resolved.num_tokens, dim)

    return TableSpec(
        tensors=tuple((name, TensorSpec(dtype, shape(dims[name]))) for name in wanted),
        tensor_format=config.job.tensor_format,
        pooled_dim=dims[wanted[0]] if config.encoder.pooled else None,
        carried=tuple((carried or {}).items()),
        grids=anyres is not None,
    )


def schema_options(config: Config, resolved: ResolvedModel) -> dict[str, object]:
    """The options that shape a table's schema, by config key (a resume or append refuses other values)."""
    from .encoder import output_dtype_name

    return {
        "encoder.features": config.encoder.features,
        "encoder.pooled": config.encoder.pooled,
        "encoder.output_dtype": output_dtype_name(config),
        "encoder.anyres_output": config.encoder.anyres_output if resolved.anyres else None,
        "job.tensor_format": config.job.tensor_format,
        "input.keep_columns": list(config.input.keep_columns),
    }


def table_identity(
    config: Config,
    resolved: ResolvedModel,
    description: EncoderDescription,
    *,
    carried: dict[str, str] | None = None,
    job: str = "",
) -> TableIdentity:
    """What a table written with ``config`` is: the encoder fingerprint, the schema and the options that
    shape it, the resolved config (``job``: the id a new table records as its creator's)."""
    import socket
    import uuid
    from datetime import UTC, datetime

    return TableIdentity(
        job=job or uuid.uuid4().hex[:12],
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        fingerprint=description.fingerprint,
        spec=table_spec(config, resolved, carried),
        options=schema_options(config, resolved),
        encoder=description.fields,
        config=config_to_dict(config),
        sources=description.sources,
        host=socket.gethostname(),
    )


def check_fingerprint(encoder: FeatureEncoder, target: ShardTarget) -> None:
    """ConfigError (``fingerprint_mismatch``) when ``encoder`` would not give ``target``'s features:
    an encoder outside the job (a Serve replica) refuses another job's shards."""
    if encoder.fingerprint != target.fingerprint:
        raise ConfigError(
            f"This encoder's fingerprint is {encoder.fingerprint[:16]}, the job's is {target.fingerprint[:16]}: "
            "its features would not be the job's",
            code=ErrorCode.FINGERPRINT_MISMATCH,
        )


class ShardWriter:
    """Encodes decoded shards with ``encoder`` and commits their files to ``target.output``."""

    def __init__(self, encoder: FeatureEncoder, target: ShardTarget) -> None:
        self.encoder = encoder
        self.target = target

    # -- encode --------------------------------------------------------------------------------

    def chunks(self, record: DecodedShard, size: int | None = None) -> list[Chunk]:
        """The device work of ``record``'s ok inputs as chunks of at most ``size`` images (anyres:
        tiles; an image with more tiles alone), to run in order; one chunk when ``size`` is None.
        With device decode (``record.data``) a chunk also decodes its inputs and marks those that
        fail as error rows of ``record``. :meth:`join` turns the chunks' results into the shard's."""
        ok = record.rows.ok_mask
        if record.data is not None:
            ok_rows = np.flatnonzero(ok)
            return [
                self._device_decode_chunk(record, ok_rows[a:b], a, b)
                for a, b in chunk_ranges(np.ones(len(ok_rows), np.int64), size)
            ]
        tiles = np.asarray(record.tiles, np.int64)[ok]
        offsets = np.concatenate([[0], np.cumsum(tiles)]).astype(np.int64)
        return [
            self._pixels_chunk(record, a, b, int(offsets[a]), int(offsets[b]))
            for a, b in chunk_ranges(tiles, size)
        ]

    def join(self, parts: list[EncodedBatch]) -> EncodedBatch:
        """The shard's results from its chunks' (the encoder's empty results for a shard without ok inputs)."""
        from .encoder import EncodedBatch

        if not parts:
            return self.encoder.encode_prepared([], pooled=self.target.pooled, features=self.target.features)  # type: ignore[arg-type]
        return EncodedBatch.concat(parts)

    def encode(self, record: DecodedShard, size: int | None = None) -> EncodedBatch:
        """All of ``record``'s device work on the calling thread."""
        return self.join([chunk() for chunk in self.chunks(record, size)])

    def _pixels_chunk(self, record: DecodedShard, a: int, b: int, t0: int, t1: int) -> Chunk:
        encoder, target = self.encoder, self.target

        def run() -> EncodedBatch:
            pixels = record.pixels[t0:t1]
            if encoder.anyres_output is None:
                return encoder.encode_pixels(pixels, features=target.features, pooled=target.pooled)  # type: ignore[arg-type]
            from .model.anyres import AnyresGrid

            ok = record.rows.ok_mask
            tile = encoder.spec.crop_height

            def column(values: list[int]) -> list[int]:
                return np.asarray(values, np.int64)[ok][a:b].tolist()

            grids = [
                AnyresGrid((w, h), (cols * tile, rows * tile), tile)
                for w, h, rows, cols in zip(
                    column(record.rows.width),
                    column(record.rows.height),
                    column(record.grid_rows),
                    column(record.grid_cols),
                    strict=True,
                )
            ]
            counts = column(record.tiles)
            return encoder.encode_tiles(pixels, counts, grids, features=target.features, pooled=target.pooled)  # type: ignore[arg-type]

        return run

    def _device_decode_chunk(self, record: DecodedShard, rows: np.ndarray, a: int, b: int) -> Chunk:
        encoder, target = self.encoder, self.target
        assert record.data is not None
        datas = record.data[a:b]

        def run() -> EncodedBatch:
            prepared = encoder.prepare_many(datas, [record.rows.uri[i] for i in rows])
            good = [p for p in prepared if not isinstance(p, DecodeError)]
            encoded = encoder.encode_prepared(good, pooled=target.pooled, features=target.features)  # type: ignore[arg-type]
            for row, result in zip(rows, prepared, strict=True):
                if isinstance(result, DecodeError):
                    record.rows.mark_error(int(row), code=str(result.code), message=result.message)
                else:
                    record.rows.set_size(int(row), result.width, result.height)
            return encoded

        return run

    # -- write ---------------------------------------------------------------------------------

    def write(self, record: DecodedShard, encoded: EncodedBatch | None) -> ShardSummary:
        """Write ``record``'s data file (its rows and ``encoded``'s features — None for a file without ok
        inputs; a unit without rows gets a file without rows, so that the table records it once committed)
        and return its summary."""
        from .table import build_batch

        target = self.target
        if encoded is None:
            if record.num_ok:
                raise ValueError(
                    f"unit {record.shard} file {record.piece}: {record.num_ok} ok inputs and no features"
                )
            encoded = self.join([])
        features = {"features": encoded.projected, "tower_features": encoded.tower}
        names = {name for name, _ in target.table.spec.tensors}
        grids = (
            [(g.rows, g.cols, g.canvas[0], g.canvas[1]) for g in encoded.grids]  # type: ignore[union-attr]
            if target.table.spec.grids and encoded.grids is not None
            else None
        )
        table = build_batch(
            record.rows,
            target.table.spec,
            features={name: values for name, values in features.items() if name in names},
            dtype=encoded.dtype,
            pooled=encoded.pooled,
            grids=grids,
        )
        file = target.table.write(table, unit=record.shard, piece=record.piece, key=record.key)
        return ShardSummary(
            shard=record.shard,
            piece=record.piece,
            last=record.last,
            rows=len(record),
            ok=record.num_ok,
            errors=record.rows.error_counts(),
            file=file,
        )

    def run(self, record: DecodedShard, size: int | None = None) -> ShardSummary:
        """Encode and write ``record`` on the calling thread."""
        return self.write(record, self.encode(record, size))
