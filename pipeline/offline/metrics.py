"""The job's Prometheus metrics (Ray's metrics export, prefixed ``ray_``), recorded by the driver.

Counters ``llava_features_job_images`` (rows written), ``llava_features_job_errors{code}`` (error rows
by code), ``llava_features_job_units`` (units committed), ``llava_features_job_files`` and
``llava_features_job_bytes_written``; gauges ``llava_features_job_images_planned`` and
``llava_features_job_units_planned``. Every one is tagged with the table's ``job`` id (one series per
job), and exported by Ray like the endpoint's ``ray_llava_features_*`` (Prometheus adds ``_total`` to
counters), so Ray's dashboard and Prometheus show a running job. Built once Ray is up, never at
import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["JobMetrics"]

_TAGS = ("job",)


class JobMetrics:
    """One job's metrics; each method records what changed since the last call."""

    def __init__(self, job: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self._tags = {"job": job}

        def counter(name: str, doc: str, tags: tuple[str, ...] = _TAGS) -> Any:
            return Counter(name, description=doc, tag_keys=tags)

        self._images = counter("llava_features_job_images", "Input rows written to the feature table.")
        self._errors = counter(
            "llava_features_job_errors", "Error rows written, by error code.", (*_TAGS, "code")
        )
        self._units = counter("llava_features_job_units", "Units committed to the feature table.")
        self._files = counter("llava_features_job_files", "Data files written.")
        self._bytes = counter("llava_features_job_bytes_written", "Bytes of the data files written.")
        self._images_planned = Gauge(
            "llava_features_job_images_planned",
            description="Input rows this run writes (unknown rows of tars not counted).",
            tag_keys=_TAGS,
        )
        self._units_planned = Gauge(
            "llava_features_job_units_planned", description="Units this run writes.", tag_keys=_TAGS
        )

    def planned(self, *, images: int, units: int) -> None:
        self._images_planned.set(images, tags=self._tags)
        self._units_planned.set(units, tags=self._tags)

    def file(self, *, rows: int, errors: Mapping[str, int], size: int) -> None:
        """A data file written: its rows, error rows by code and bytes."""
        if rows:
            self._images.inc(rows, tags=self._tags)
        for code, n in errors.items():
            if n:
                self._errors.inc(n, tags={**self._tags, "code": code})
        self._files.inc(1, tags=self._tags)
        if size:
            self._bytes.inc(size, tags=self._tags)

    def units(self, committed: int) -> None:
        """``committed`` more units committed."""
        if committed:
            self._units.inc(committed, tags=self._tags)
