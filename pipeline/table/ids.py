"""The table's key, ``image_id``: a compact set of the ids a table holds, for ``--append``.

An append reads the ``image_id`` column of the table once and hands the set to the decode tasks,
which leave out the inputs already there. :class:`IdSet` keeps 16-byte BLAKE2b digests in one sorted
numpy array (16 bytes an id: 160 MB for 10⁷ rows, one object to ship to the workers); two different
ids share a digest with probability about n²/2¹²⁹ (10⁻²³ for 10⁸ ids).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from ..storage.names import name_text

__all__ = ["IdSet"]

_DIGEST = np.dtype("S16")


def _digests(ids: Iterable[str]) -> np.ndarray:
    return np.array(
        # The stored form of an id (pipeline.storage.names): a listed name that is not UTF-8 matches its row.
        [hashlib.blake2b(name_text(i).encode("utf-8"), digest_size=16).digest() for i in ids],
        dtype=_DIGEST,
    )


class IdSet:
    """A set of image ids, answered by digest (see the module docstring)."""

    def __init__(self, digests: np.ndarray | None = None) -> None:
        self.digests = np.unique(digests) if digests is not None else np.zeros(0, _DIGEST)

    @classmethod
    def of(cls, ids: Iterable[str]) -> IdSet:
        return cls(_digests(ids))

    def __len__(self) -> int:
        return len(self.digests)

    def contains(self, ids: Sequence[str]) -> np.ndarray:
        """(n,) bool: whether each of ``ids`` is in the set."""
        if not len(ids) or not len(self.digests):
            return np.zeros(len(ids), dtype=bool)
        wanted = _digests(ids)
        pos = np.searchsorted(self.digests, wanted)
        pos[pos == len(self.digests)] = 0
        return self.digests[pos] == wanted

    def __contains__(self, image_id: str) -> bool:
        return bool(self.contains([image_id])[0])
