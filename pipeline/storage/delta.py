"""Where delta-rs finds a location: its URI and storage options (the same settings as resolve_filesystem)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from .fs import _effective_s3_endpoint, _effective_s3_region, split_uri

__all__ = ["delta_location", "delta_storage_options"]


def delta_location(uri: str) -> str:
    """``uri`` as delta-rs takes it: an absolute local path, ``s3://bucket/prefix``, ``gs://bucket/prefix``."""
    scheme, path = split_uri(uri)
    if scheme == "local":
        return path
    return f"{'gs' if scheme == 'gcs' else scheme}://{path}"


def delta_storage_options(
    uri: str, *, s3_endpoint: str | None = None, s3_region: str | None = None
) -> dict[str, str]:
    """delta-rs storage options for ``uri``: the endpoint and region rules of resolve_filesystem."""
    scheme, _ = split_uri(uri)
    options: dict[str, str] = {}
    if scheme == "s3":
        endpoint = _effective_s3_endpoint(s3_endpoint)
        region = _effective_s3_region(s3_region, endpoint)
        if endpoint:
            options["AWS_ENDPOINT_URL"] = endpoint
            if endpoint.startswith("http://"):
                options["AWS_ALLOW_HTTP"] = "true"
        if region:
            options["AWS_REGION"] = region
        if not os.environ.get("AWS_S3_LOCKING_PROVIDER"):
            options["conditional_put"] = "etag"
    elif scheme in ("gs", "gcs"):
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            parsed = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
            options.update(
                google_base_url=f"{parsed.scheme or 'http'}://{parsed.netloc}",
                google_skip_signature="true",
                allow_http="true",
            )
    return options
