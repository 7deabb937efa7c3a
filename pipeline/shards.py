"""A decoded shard → its committed Parquet file: the encode + write stage of the offline job.

One owner for both pools that run it: the job's own actor pool (:class:`pipeline.job.EncodeShardActor`)
and the encoder replicas of a Serve application (``llava-features encode --serve-app``, the pool
shared with the endpoint). :class:`ShardWriter` encodes a :class:`~pipeline.records.DecodedShard`'s
ok inputs with a :class:`~pipeline.encoder.FeatureEncoder` — in one call, or in chunks of a few images
that the caller runs one at a time on its device (:meth:`ShardWriter.chunks`: a Serve replica runs
online batches between them) — builds the file's table (:func:`pipeline.sink.build_table`), writes it
under its final name (:func:`pipeline.sink.write_shard`: temporary name + rename locally, final-name
PUT on object stores, so a retried file replaces the earlier attempt's), and returns the small
:class:`~pipeline.records.ShardSummary` the job's driver turns into the unit's commit record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .constants import shard_file_name
from .model.errors import ConfigError, DecodeError, ErrorCode
from .records import DecodedShard, ShardSummary, ShardTarget

if TYPE_CHECKING:
    from .encoder import EncodedBatch, FeatureEncoder

logger = logging.getLogger(__name__)

__all__ = ["ShardWriter", "check_fingerprint", "chunk_ranges"]

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
        from .sink import ensure_registered
        from .storage import resolve_filesystem

        ensure_registered()
        self.encoder = encoder
        self.target = target
        self.fs, self.out_path = resolve_filesystem(target.output, s3_endpoint=target.s3_endpoint)

    # -- encode --------------------------------------------------------------------------------

    def chunks(self, record: DecodedShard, size: int | None = None) -> list[Chunk]:
        """The device work of ``record``'s ok inputs as chunks of at most ``size`` images (anyres:
        tiles; an image with more tiles alone), to run in order; one chunk when ``size`` is None.
        With device decode (``record.data``) a chunk also decodes its inputs and marks those that
        fail as error rows of ``record``. :meth:`join` turns the chunks' results into the shard's."""
        if record.data is not None:
            ok_rows = np.flatnonzero(record.ok)
            return [
                self._device_decode_chunk(record, ok_rows[a:b], a, b)
                for a, b in chunk_ranges(np.ones(len(ok_rows), np.int64), size)
            ]
        ok = record.ok
        tiles = record.tiles[ok].astype(np.int64)
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

            ok = record.ok
            tile = encoder.spec.crop_height
            grids = [
                AnyresGrid((int(w), int(h)), (int(cols) * tile, int(rows) * tile), tile)
                for w, h, rows, cols in zip(
                    record.width[ok][a:b],
                    record.height[ok][a:b],
                    record.grid_rows[ok][a:b],
                    record.grid_cols[ok][a:b],
                    strict=True,
                )
            ]
            counts = record.tiles[ok][a:b].tolist()
            return encoder.encode_tiles(pixels, counts, grids, features=target.features, pooled=target.pooled)  # type: ignore[arg-type]

        return run

    def _device_decode_chunk(self, record: DecodedShard, rows: np.ndarray, a: int, b: int) -> Chunk:
        encoder, target = self.encoder, self.target
        assert record.data is not None
        datas = record.data[a:b]

        def run() -> EncodedBatch:
            prepared = encoder.prepare_many(datas, [record.uri[i] for i in rows])
            good = [p for p in prepared if not isinstance(p, DecodeError)]
            encoded = encoder.encode_prepared(good, pooled=target.pooled, features=target.features)  # type: ignore[arg-type]
            for row, result in zip(rows, prepared, strict=True):
                if isinstance(result, DecodeError):
                    record.ok[row] = False
                    record.error_code[row], record.error_message[row] = str(result.code), result.message
                else:
                    record.width[row], record.height[row] = result.width, result.height
            return encoded

        return run

    # -- write ---------------------------------------------------------------------------------

    def write(self, record: DecodedShard, encoded: EncodedBatch | None) -> ShardSummary:
        """Commit ``record``'s file (its rows and ``encoded``'s features; nothing for a unit without
        rows) under its final name and return its summary."""
        from .sink import ShardRows, build_table, write_shard

        target = self.target
        name = ""
        if len(record):
            assert encoded is not None
            table = build_table(
                ShardRows.from_record(record),
                features=encoded.projected,
                tower_features=encoded.tower,
                pooled=encoded.pooled,
                dtype=encoded.dtype,
                tensor_format=target.tensor_format,
                metadata=target.metadata,
                grids=encoded.grids,
                carried_types=target.carried_types,
            )
            write_shard(
                table,
                self.out_path,
                record.shard,
                filesystem=self.fs,
                compression=target.compression,
                piece=record.piece,
            )
            name = shard_file_name(record.shard, record.piece)
        errors: dict[str, int] = {}
        for code, ok in zip(record.error_code, record.ok, strict=True):
            if not ok:
                errors[code] = errors.get(code, 0) + 1
        return ShardSummary(
            shard=record.shard,
            piece=record.piece,
            last=record.last,
            rows=len(record),
            ok=record.num_ok,
            file=name,
            errors=errors,
        )

    def run(self, record: DecodedShard, size: int | None = None) -> ShardSummary:
        """Encode and commit ``record`` on the calling thread."""
        return self.write(record, self.encode(record, size) if len(record) else None)
