"""Where a table is: one location, seen through pyarrow (data files) and through delta-rs (the log).

A :class:`TableLocation` is plain strings (the URI and the storage settings), so it crosses the Ray
hop; each process builds its filesystems from it (cached per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..storage import (
    delta_location,
    delta_storage_options,
    format_uri,
    join_path,
    resolve_filesystem,
    split_uri,
)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = ["TableLocation"]


@dataclass(frozen=True)
class TableLocation:
    """A table's location (local paths absolute) and the S3 settings to reach it."""

    uri: str
    s3_endpoint: str | None = None
    """``job.s3_endpoint``."""
    s3_region: str | None = None

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem of the location (data files, leases, markers)."""
        return self._resolved()[0]

    @property
    def path(self) -> str:
        """The table's folder in :attr:`filesystem`."""
        return self._resolved()[1]

    def _resolved(self) -> tuple[pafs.FileSystem, str]:
        # resolve_filesystem caches filesystems per process and settings (credentials included).
        return resolve_filesystem(self.uri, s3_endpoint=self.s3_endpoint, s3_region=self.s3_region)

    def join(self, name: str) -> str:
        """The path in :attr:`filesystem` of ``name`` (relative to the table)."""
        return join_path(self.path, name)

    def uri_of(self, name: str) -> str:
        """The URI of ``name`` (relative to the table)."""
        scheme, _ = split_uri(self.uri)
        return format_uri(scheme, self.join(name))

    @property
    def delta_uri(self) -> str:
        """The location as delta-rs takes it."""
        return delta_location(self.uri)

    def storage_options(self) -> dict[str, Any]:
        """delta-rs's storage options for the location (the same endpoint, region and credentials as
        :attr:`filesystem`)."""
        return delta_storage_options(self.uri, s3_endpoint=self.s3_endpoint, s3_region=self.s3_region)
