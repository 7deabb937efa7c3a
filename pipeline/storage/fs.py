"""URIs and filesystems: local paths, ``s3://`` and ``gs://`` through pyarrow, one cached filesystem per
settings and process, and the output location helpers.

S3 settings come from the usual AWS environment (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, and the credentials ``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` through the AWS SDK's default chain); an explicit
``s3_endpoint`` (``--s3-endpoint``) wins over the environment. For GCS, ``STORAGE_EMULATOR_HOST``
selects an emulator (anonymous); otherwise Google's default credentials are used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from ..model.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_SCHEMES = ("local path", "file://", "s3://", "gs://")
_SCHEME_ALIASES = {"s3": "s3", "gs": "gs", "gcs": "gs"}


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, path)`` of ``uri``: scheme is ``"local"``, ``"s3"`` or ``"gs"``.

    The path is what the pyarrow filesystem expects: an absolute local path, or
    ``bucket/key`` (no trailing ``/``) for object stores. Raises ConfigError for an unknown
    scheme or a missing bucket.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"Empty storage URI: {uri!r}")
    uri = uri.strip()
    if "://" not in uri:
        return "local", os.path.abspath(os.path.expanduser(uri))
    raw_scheme, rest = uri.split("://", 1)
    scheme = raw_scheme.lower()
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        return "local", os.path.abspath(unquote(rest))
    if scheme not in _SCHEME_ALIASES:
        raise ConfigError(
            f"Unsupported URI scheme {raw_scheme!r} in {uri!r}; supported: {', '.join(SUPPORTED_SCHEMES)}"
        )
    path = rest.rstrip("/")
    if not path or path.startswith("/"):
        raise ConfigError(f"URI {uri!r} names no bucket")
    return _SCHEME_ALIASES[scheme], path


def format_uri(scheme: str, path: str) -> str:
    """The URI of ``path`` in a filesystem of ``scheme`` (the inverse of :func:`split_uri`)."""
    return path if scheme == "local" else f"{scheme}://{path}"


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute (``~`` expanded, ``file://`` dropped); object-store URIs as given."""
    scheme, path = split_uri(uri)
    return path if scheme == "local" else uri.strip().rstrip("/")


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _effective_s3_endpoint(s3_endpoint: str | None) -> str | None:
    return s3_endpoint or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _effective_s3_region(s3_region: str | None, endpoint: str | None) -> str | None:
    region = s3_region or _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region is None and endpoint:
        region = "us-east-1"
    return region


def parse_endpoint(endpoint: str, what: str) -> tuple[str, str]:
    """``(scheme, host[:port])`` of an endpoint URL; a bare ``host[:port]`` means https."""
    parsed = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
        raise ConfigError(f"Invalid {what} {endpoint!r}: expected http(s)://host[:port]")
    return parsed.scheme, parsed.netloc


_FS_CACHE: dict[tuple[Any, ...], pafs.FileSystem] = {}
_REGION_CACHE: dict[str, str | None] = {}
_FS_LOCK = threading.Lock()


def _credentials_key() -> int:
    # Part of the cache key so that changed credentials in the environment build a new filesystem.
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return hash(tuple(os.environ.get(n) for n in names))


def _bucket_region(bucket: str) -> str | None:
    """The region of an AWS bucket (one anonymous request, cached); None when it can't be resolved."""
    with _FS_LOCK:
        if bucket in _REGION_CACHE:
            return _REGION_CACHE[bucket]
    try:
        region: str | None = pafs.resolve_s3_region(bucket)
    except (OSError, ValueError) as exc:
        logger.debug("could not resolve the region of bucket %s: %s", bucket, exc)
        region = None
    with _FS_LOCK:
        _REGION_CACHE[bucket] = region
    return region


@dataclass(frozen=True)
class S3Connection:
    """Where the S3 requests for one bucket go: the settings resolved once, for every S3 client we build."""

    scheme: str | None  # "http" or "https" of an S3-compatible endpoint; None: AWS itself
    host: str | None  # host[:port] of that endpoint; None: AWS itself
    region: str | None  # None: it could not be resolved (the client's own default applies)


def s3_connection(bucket: str, s3_endpoint: str | None, s3_region: str | None) -> S3Connection:
    """The endpoint and region of ``bucket`` for the ``s3_endpoint``/``s3_region`` settings.

    ``s3_endpoint`` beats AWS_ENDPOINT_URL_S3, which beats AWS_ENDPOINT_URL (a bare ``host[:port]``
    means https); ``s3_region`` beats AWS_REGION, then AWS_DEFAULT_REGION, then us-east-1 when an
    endpoint is set; with neither an endpoint nor a region, the bucket's region is looked up (one
    anonymous request to AWS, cached). Raises ConfigError for a malformed endpoint.
    """
    endpoint = _effective_s3_endpoint(s3_endpoint)
    region = _effective_s3_region(s3_region, endpoint)
    scheme = host = None
    if endpoint:
        scheme, host = parse_endpoint(endpoint, "S3 endpoint")
    if region is None:
        # Neither an endpoint nor a region: ask AWS where the bucket lives (like FileSystem.from_uri).
        region = _bucket_region(bucket)
    return S3Connection(scheme=scheme, host=host, region=region)


def _s3_filesystem(bucket: str, s3_endpoint: str | None, s3_region: str | None) -> pafs.FileSystem:
    connection = s3_connection(bucket, s3_endpoint, s3_region)
    kwargs: dict[str, Any] = {}
    if connection.host:
        kwargs["scheme"], kwargs["endpoint_override"] = connection.scheme, connection.host
    if connection.region:
        kwargs["region"] = connection.region
    return _cached(("s3", tuple(sorted(kwargs.items())), _credentials_key()), pafs.S3FileSystem, kwargs)


def _cached(key: tuple[Any, ...], factory: Any, kwargs: dict[str, Any]) -> pafs.FileSystem:
    """One filesystem per settings, per process."""
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = factory(**kwargs)
            _FS_CACHE[key] = fs
    return fs


def gcs_emulator() -> tuple[str, str] | None:
    """``(scheme, host:port)`` of the GCS emulator STORAGE_EMULATOR_HOST names (``http`` when it has no
    scheme); None when it is unset, i.e. Google Cloud Storage itself with Google's default credentials."""
    emulator = _env("STORAGE_EMULATOR_HOST")
    if not emulator:
        return None
    parsed = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
    return parsed.scheme or "http", parsed.netloc


def _gcs_filesystem() -> pafs.FileSystem:
    emulator = gcs_emulator()
    kwargs: dict[str, Any] = {}
    if emulator:
        kwargs = {"anonymous": True, "scheme": emulator[0], "endpoint_override": emulator[1]}
    return _cached(("gs", tuple(sorted(kwargs.items()))), pafs.GcsFileSystem, kwargs)


def filesystem_for(
    scheme: str, path: str, s3_endpoint: str | None, s3_region: str | None = None
) -> pafs.FileSystem:
    """The (cached) filesystem of ``scheme`` for ``path`` (its bucket picks the S3 region)."""
    if scheme == "local":
        return pafs.LocalFileSystem()
    if scheme == "s3":
        return _s3_filesystem(path.split("/", 1)[0], s3_endpoint, s3_region)
    return _gcs_filesystem()


def resolve_filesystem(
    uri: str, *, s3_endpoint: str | None = None, s3_region: str | None = None
) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it.

    Local paths (relative, absolute, ``~``, ``file://``) give a LocalFileSystem and an absolute
    path; ``s3://bucket/prefix`` an S3FileSystem and ``bucket/prefix``; ``gs://``/``gcs://`` a
    GcsFileSystem and ``bucket/prefix``. The S3 endpoint and region are what :func:`s3_connection`
    resolves from ``s3_endpoint``/``s3_region`` and the environment; STORAGE_EMULATOR_HOST selects
    a GCS emulator (:func:`gcs_emulator`). Filesystems are cached per process and settings.
    Raises ConfigError for an unsupported scheme.
    """
    scheme, path = split_uri(uri)
    return filesystem_for(scheme, path, s3_endpoint, s3_region), path


def join_path(folder: str, name: str) -> str:
    """``folder/name`` for a path inside a filesystem (``bucket/prefix`` or an absolute local path):
    the one way paths are joined, for inputs and outputs alike."""
    name = name.lstrip("/")
    return f"{folder.rstrip('/')}/{name}" if folder else name


def relative_path(path: str, base: str) -> str:
    """``path`` relative to the folder ``base`` (both paths of one filesystem)."""
    if base in ("", "/"):
        return path.lstrip("/")
    return path[len(base) :].lstrip("/")


# --------------------------------------------------------------------------------------------
# Output location
# --------------------------------------------------------------------------------------------


def output_is_empty(output_uri: str, s3_endpoint: str | None = None) -> bool:
    """True when nothing exists at ``output_uri`` or it is an empty folder/prefix.

    A file (object) at ``output_uri`` itself counts as not empty. Raises ConfigError when the
    location can't be inspected.
    """
    fs, path = resolve_filesystem(output_uri, s3_endpoint=s3_endpoint)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return True
        if info.type != pafs.FileType.Directory:
            return False
        if fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)):
            return False
        # GCS lists only objects one level down, never the implied sub-folders of deeper ones.
        return not fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise ConfigError(f"Cannot inspect the output location {output_uri}: {exc}") from exc


def ensure_output_dir(output_uri: str, *, s3_endpoint: str | None = None) -> None:
    """Create a local output folder (``mkdir -p``); a no-op for object stores (validated only).

    Raises ConfigError when a local file is in the way or the folder can't be created.
    """
    scheme, path = split_uri(output_uri)
    if scheme != "local":
        if s3_endpoint is not None:
            parse_endpoint(s3_endpoint, "S3 endpoint")
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"Output location {output_uri} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create the output folder {output_uri}: {exc}") from exc


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The JSON object stored at ``path`` (None when there is no file there)."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(fs: pafs.FileSystem, path: str, value: dict[str, Any]) -> None:
    """Write ``value`` as JSON at ``path``, atomically: a local file is written under a hidden temporary
    name and renamed; an object-store upload only becomes visible once complete."""
    data = json.dumps(value, indent=2, sort_keys=True, default=str).encode()
    if fs.type_name != "local":
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
