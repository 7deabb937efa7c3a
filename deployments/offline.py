"""The offline job's files on a replica (one GPU pool for both front doors, ``encode --serve-app``).

:class:`OfflineShards` holds a replica's shard writers (``pipeline.shards.ShardWriter``, one per job
target), its write threads and its counters; :meth:`OfflineShards.encode` runs one decoded file's
device work in chunks on the device queue's low-priority lane (online first), writes its data
file off the event loop and returns the file's summary (the job's driver commits it to the table). The shard types are the job's own, opaque
here (``ShardTarget``, ``DecodedShard``, ``ShardSummary``).

Serve logs an access line for every handle call a replica answers (``CALL encode_shard OK 812.3ms``):
one per file of a job, hundreds per job, each saying nothing the job's own progress does not.
:class:`QuietOfflineCalls` drops those of successful offline calls; failed ones stay.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pipeline.constants import SERVE_DESCRIBE_METHOD, SERVE_SHARD_METHOD

from .listen import SERVE_LOGGER
from .scheduling import DeviceQueue

if TYPE_CHECKING:
    from pipeline.records import DecodedShard, ShardSummary, ShardTarget
    from pipeline.shards import ShardWriter

logger = logging.getLogger(__name__)

OFFLINE_WRITE_THREADS = 2
"""Threads per replica writing offline files' Parquet (off the event loop and the device)."""
KEPT_WRITERS = 4
"""Offline jobs' shard writers a replica keeps (one per job target; the oldest are dropped)."""


class QuietOfflineCalls(logging.Filter):
    """A filter of Serve's logger: without the access lines of successful offline calls (see the module
    docstring). Other lines, and the access lines of HTTP requests and of failed calls, pass."""

    LINE = re.compile(rf"^(?:\S+ )?CALL (?:{SERVE_SHARD_METHOD}|{SERVE_DESCRIBE_METHOD}) OK ")

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "serve_access_log", False):
            return True
        return not self.LINE.match(record.getMessage())

    @classmethod
    def install(cls) -> None:
        """Add the filter to Serve's logger of this process (once)."""
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if not any(isinstance(f, cls) for f in serve_logger.filters):
            serve_logger.addFilter(cls())


class OfflineShards:
    """A replica's offline files: writers, write threads, counters and the files in progress."""

    def __init__(self, encoder: Any, device: DeviceQueue, chunk_size: int) -> None:
        self.encoder = encoder
        self.device = device
        self.chunk_size = chunk_size
        self.in_flight = 0
        """Files this replica is working on now (what the autoscaler counts for the offline door)."""
        self.counts: Counter[str] = Counter()
        """``shards``, ``images`` and ``chunks`` done."""
        self._writers: collections.OrderedDict[str, ShardWriter] = collections.OrderedDict()
        self._write_pool = ThreadPoolExecutor(OFFLINE_WRITE_THREADS, thread_name_prefix="write")
        QuietOfflineCalls.install()

    def _writer(self, target: ShardTarget) -> ShardWriter:
        """The writer of a job's files (one per job target, the last few kept)."""
        from pipeline.shards import ShardWriter, check_fingerprint

        check_fingerprint(self.encoder, target)
        key = json.dumps(dataclasses.asdict(target), sort_keys=True, default=str)
        writer = self._writers.pop(key, None) or ShardWriter(self.encoder, target)
        self._writers[key] = writer
        while len(self._writers) > KEPT_WRITERS:
            self._writers.popitem(last=False)
        return writer

    async def encode(self, target: ShardTarget, record: DecodedShard) -> ShardSummary:
        """One decoded file of an offline job → a data file of its table (``target.table``); its summary back.

        Its device work runs in chunks of ``chunk_size`` images (anyres: tiles) on the device queue's
        low-priority lane (a chunk starts only when no online batch waits), the Parquet write in the
        write threads. Raises ConfigError (``fingerprint_mismatch``) for a job whose fingerprint is
        not this replica's."""
        self.in_flight += 1
        try:
            writer = self._writer(target)
            started = time.perf_counter()
            encoded = None
            if len(record):
                chunks = writer.chunks(record, self.chunk_size)
                encoded = writer.join([await self.device.offline(chunk) for chunk in chunks])
                self.counts["chunks"] += len(chunks)
            loop = asyncio.get_running_loop()
            summary = await loop.run_in_executor(self._write_pool, writer.write, record, encoded)
        finally:
            self.in_flight -= 1
        self.counts["shards"] += 1
        self.counts["images"] += record.num_ok
        logger.debug(
            "Wrote %s (%d rows) in %.2fs",
            summary.file.path if summary.file is not None else "no file",
            summary.rows,
            time.perf_counter() - started,
        )
        return summary
