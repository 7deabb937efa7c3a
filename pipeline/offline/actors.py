"""Stage 2 of the job on its own actor pool: encoder actors that encode decoded files and write them.

:class:`EncodeShardActor` is a Ray Data actor (an autoscaling pool, ``job.actors``) holding one
:class:`~pipeline.encoder.FeatureEncoder` replica; it encodes a file's ok images in batches and writes
the data file itself (:class:`pipeline.shards.ShardWriter`, which the shared pool's Serve replicas run
too), so feature tensors never travel back through the object store or the driver: only a small
:class:`~pipeline.records.ShardSummary` does. A file that cannot be written (disk full, a read-only
output) comes back as a summary with its fault, for the driver to stop the job with one line.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from ..config import Config
from ..model.errors import ErrorCode, OutputError
from ..records import DecodedShard, ShardSummary, ShardTarget, rows_of_batch, rows_to_batch
from ..table import TableRun

if TYPE_CHECKING:
    from ..model import ResolvedModel

__all__ = ["EncodeShardActor", "shard_target"]


class EncodeShardActor:
    """Ray Data actor: one FeatureEncoder replica; encodes output files' inputs and writes the data files.

    Two calls may run at once on an actor: the device work is serialised by a lock, so one file's
    Parquet write overlaps the next one's encode.
    """

    def __init__(self, config: Config, resolved: ResolvedModel, target: ShardTarget) -> None:
        from ..encoder import FeatureEncoder
        from ..shards import ShardWriter

        encoder = FeatureEncoder(config, resolved)
        encoder.warmup(min(config.encoder.batch_size, 8))
        self.writer = ShardWriter(encoder, target)
        self.lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = []
        for row in rows_of_batch(batch):
            record = DecodedShard.from_row(row)
            with self.lock:
                encoded = self.writer.encode(record)
            try:
                summary = self.writer.write(record, encoded)
            except OutputError as exc:  # disk full, read-only, a store refusing: the driver stops the job
                if exc.code != ErrorCode.OUTPUT_WRITE_FAILED:
                    raise
                summary = ShardSummary.failed(record, exc)
            summaries.append(summary.to_row())
        return rows_to_batch(summaries)


def shard_target(config: Config, run: TableRun, fingerprint: str) -> ShardTarget:
    """What the encoders need to write this run's data files, whichever pool encodes them."""
    return ShardTarget(
        fingerprint=fingerprint,
        features=config.encoder.features,
        pooled=config.encoder.pooled,
        table=run.target(config.job.compression),
    )
