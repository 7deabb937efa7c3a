"""Stage 1 of the job: decode tasks (CPU) expand units of the plan into decoded output files.

One row per pending unit → :func:`decode_unit` (a Ray Data ``map_batches`` task of one CPU), which
reads the unit's inputs (timed reads), runs the decode guard and preprocesses to uint8, and yields
one typed :class:`~pipeline.records.DecodedShard` per output file of ``job.shard_size`` inputs, as
soon as it is ready. A bad input becomes an error row, never an exception; an unexpected failure
on one input is recorded on its row (``internal``), not raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import Config
from ..model.errors import DecodeError, ErrorCode, InputReadError
from ..records import DecodedShard, rows_of_batch, rows_to_batch
from ..storage import ReadOptions, Unit
from ..table import IdSet

if TYPE_CHECKING:
    from ..model import ResolvedModel

logger = logging.getLogger(__name__)

__all__ = ["decode_task_memory", "decode_unit", "read_options", "unit_batch"]

DECODE_WORKER_BASE_BYTES = 512 * 1024 * 1024
"""Memory of a decode worker before its first file: a Python worker with PIL, numpy and the decode
guard loaded."""
_READ_AHEAD_BYTES = 2 * 4 * 1024 * 1024
"""Encoded bytes per input a decode task may hold: this file's and the next one's (read ahead)."""


def read_options(config: Config) -> ReadOptions:
    """What decode tasks need to expand units, from the config."""
    return ReadOptions(
        s3_endpoint=config.job.s3_endpoint,
        threads=config.job.decode_threads,
        max_bytes=config.decode.max_bytes,
        timeout_s=config.job.read_timeout_s,
        image_column=config.input.image_column,
        id_column=config.input.id_column,
        keep_columns=config.input.keep_columns,
    )


def decode_task_memory(config: Config, resolved: ResolvedModel) -> int:
    """Bytes a decode task reserves: one output file's uint8 pixels (anyres: the base image and the tiles
    of the largest canvas), its encoded inputs and the next file's (read ahead), on a loaded worker."""
    from ..encoder import preprocess_spec

    spec = preprocess_spec(resolved, config.decode)
    tiles = 1 + max(
        (w * h // (spec.crop_height * spec.crop_width) for w, h in spec.grid_pinpoints), default=0
    )
    per_image = tiles * 3 * spec.crop_height * spec.crop_width + _READ_AHEAD_BYTES
    return DECODE_WORKER_BASE_BYTES + config.job.shard_size * per_image


@dataclass(frozen=True)
class _PieceSpec:
    """How a decode task turns its samples into decoded files (the same for every file of the task)."""

    preprocessor: Any
    """The decode guard + preprocessing (:class:`pipeline.images.preprocess.Preprocessor`)."""
    device_decode: bool
    """``decode.nvjpeg``: only read here; the encoder decodes on its device."""
    keep: tuple[str, ...]
    """``input.keep_columns``."""

    def decode(self, samples: list[Any], *, unit: Unit, key: str, piece: int) -> DecodedShard:
        """One output file of ``unit`` from its ``samples`` (bad inputs as error rows)."""
        record = DecodedShard(shard=unit.index, key=key, piece=piece, data=[] if self.device_decode else None)
        record.rows.carried = {c: [] for c in self.keep}
        ok_pixels = []
        for sample in samples:
            try:
                if sample.error is not None:
                    raise sample.error
                if self.device_decode:
                    record.data.append(sample.data)  # type: ignore[union-attr]
                    record.add_ok(sample.image_id, sample.uri, carried=sample.carried)
                    continue
                prepared = self.preprocessor(sample.data, sample.uri)
                tiles = prepared.tiles  # (1, 3, S, S); anyres: the base image and the grid's tiles
                ok_pixels.append(tiles)
                grid = (prepared.grid.rows, prepared.grid.cols) if prepared.grid is not None else (0, 0)
                record.add_ok(
                    sample.image_id,
                    sample.uri,
                    width=prepared.width,
                    height=prepared.height,
                    carried=sample.carried,
                    tiles=len(tiles),
                    grid=grid,
                )
            except (DecodeError, InputReadError) as exc:
                record.add_error(
                    sample.image_id,
                    sample.uri,
                    code=str(exc.code),
                    message=exc.message,
                    carried=sample.carried,
                )
            except Exception as exc:  # a bug must not take the job down: record it on the row
                logger.exception("Unexpected failure on %s", sample.uri)
                record.add_error(
                    sample.image_id,
                    sample.uri,
                    code=str(ErrorCode.INTERNAL),
                    message=f"{type(exc).__name__}: {exc}",
                    carried=sample.carried,
                )
            sample.data = None  # the encoded bytes are not needed any more
        if ok_pixels:
            record.pixels = np.concatenate(ok_pixels)
        else:
            spec = self.preprocessor.spec
            record.pixels = np.zeros((0, 3, spec.crop_height, spec.crop_width), np.uint8)
        return record


def _new_samples(pieces: Iterator[list[Any]], held: IdSet | None) -> Iterator[list[Any]]:
    """``pieces`` less the inputs a table holds already (``--append``); pieces left empty are dropped."""
    for samples in pieces:
        if held is not None and len(held):
            flags = held.contains([s.image_id for s in samples])
            samples = [s for s, present in zip(samples, flags, strict=True) if not present]
        if samples:
            yield samples


def decode_unit(
    batch: dict[str, np.ndarray],
    *,
    config: Config,
    resolved: ResolvedModel,
    read: ReadOptions,
    shard_size: int,
    held: IdSet | None = None,
) -> Iterator[dict[str, Any]]:
    """Expand every unit row of ``batch`` into its output files: one :class:`DecodedShard` row each,
    ``shard_size`` inputs at a time, yielded as they are ready. Never raises for an input.

    With ``decode.nvjpeg`` the encoder decodes on its own device: inputs are only read here. With
    ``held`` (``--append``) the inputs whose id the table holds already are left out. A unit without
    rows gives one empty file (so that the table records it as done).
    """
    from ..encoder import preprocess_spec
    from ..images.preprocess import Preprocessor
    from ..storage import expand_unit

    spec = _PieceSpec(
        preprocessor=Preprocessor(preprocess_spec(resolved, config.decode), config.decode),
        device_decode=config.decode.nvjpeg,
        keep=tuple(read.keep_columns),
    )
    for row in rows_of_batch(batch):
        unit = Unit.from_row(row)
        key = str(row["key"])
        pieces = _new_samples(expand_unit(unit, shard_size, read), held)
        current = next(pieces, None)
        if current is None:  # a unit without (new) rows: one empty file
            yield rows_to_batch([spec.decode([], unit=unit, key=key, piece=0).to_row()])
            continue
        piece = 0
        while current is not None:
            record = spec.decode(current, unit=unit, key=key, piece=piece)
            current = next(pieces, None)  # read ahead: is this the unit's last file?
            record.last = current is None
            yield rows_to_batch([record.to_row()])
            piece += 1


def unit_batch(units: Sequence[Unit], keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The numpy batch of plan rows that :func:`decode_unit` receives for ``units`` (with their content
    keys), as the job hands them to Ray Data. For running the job's stages in one process (the
    in-process benchmark, the GPU tests)."""
    keys = keys if keys is not None else ["0" * 64] * len(units)
    return rows_to_batch([{**u.to_row(), "key": k} for u, k in zip(units, keys, strict=True)])
