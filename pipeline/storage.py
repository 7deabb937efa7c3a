"""The input side of the offline job: where images are, how to list and read them, how to shard.

``--input`` is one of

* a local directory (``/data/images``, ``./images``, ``file:///data/images``) or an object-store
  prefix (``s3://bucket/prefix``, ``gs://bucket/prefix``): every file under it, recursively,
  whose extension is in :data:`IMAGE_EXTENSIONS` (case-insensitive; hidden files and folders,
  whose name starts with ``.``, are skipped);
* a glob (``/data/*/*.jpg``, ``s3://bucket/photos/**/*.png``): exactly the files it matches
  (``*`` and ``?`` never cross ``/``; ``**`` matches any number of folders; ``[abc]`` classes);
* a single image file or object;
* a manifest: a ``.parquet`` or ``.csv`` file (local or on s3/gs) with a ``uri`` column and an
  optional ``image_id`` column. Relative ``uri``s are resolved against the manifest's folder.

Every path goes through pyarrow filesystems. S3 settings come from the usual AWS environment
(``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and the
credentials ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` through the AWS
SDK's default chain); an explicit ``s3_endpoint`` (``--s3-endpoint``) wins over the environment.
For GCS, ``STORAGE_EMULATOR_HOST`` selects an emulator (anonymous); otherwise Google's default
credentials are used.

Workers receive plain URIs plus the ``s3_endpoint`` setting (and the storage environment, which
the job forwards) and build their filesystems themselves (:func:`resolve_filesystem`, cached per
process); filesystem objects never cross the Ray hop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from .model.errors import ConfigError, ErrorCode, InputReadError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "InputItem",
    "Shard",
    "ensure_output_dir",
    "is_image_path",
    "join_path",
    "list_inputs",
    "output_is_empty",
    "plan_fingerprint",
    "plan_shards",
    "read_bytes",
    "resolve_filesystem",
    "split_uri",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
"""Extensions (lower case, with the dot) listed from a directory or prefix; matched case-insensitively."""

MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".parquet", ".csv"})
"""An input file with one of these extensions is read as a manifest."""

SUPPORTED_SCHEMES = ("local path", "file://", "s3://", "gs://")
_SCHEME_ALIASES = {"s3": "s3", "gs": "gs", "gcs": "gs"}
_GLOB_CHARS = frozenset("*?[")
_PLAN_VERSION = "llava-features/plan/v1"


# --------------------------------------------------------------------------------------------
# URIs and filesystems
# --------------------------------------------------------------------------------------------


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


def _format_uri(scheme: str, path: str) -> str:
    return path if scheme == "local" else f"{scheme}://{path}"


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


def _parse_endpoint(endpoint: str, what: str) -> tuple[str, str]:
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


def _s3_filesystem(bucket: str, s3_endpoint: str | None, s3_region: str | None) -> pafs.FileSystem:
    endpoint = _effective_s3_endpoint(s3_endpoint)
    region = _effective_s3_region(s3_region, endpoint)
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["scheme"], kwargs["endpoint_override"] = _parse_endpoint(endpoint, "S3 endpoint")
    if region is None:
        # Neither an endpoint nor a region: ask AWS where the bucket lives (like FileSystem.from_uri).
        region = _bucket_region(bucket)
    if region:
        kwargs["region"] = region
    return _cached(("s3", tuple(sorted(kwargs.items())), _credentials_key()), pafs.S3FileSystem, kwargs)


def _cached(key: tuple[Any, ...], factory: Any, kwargs: dict[str, Any]) -> pafs.FileSystem:
    """One filesystem per settings, per process."""
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = factory(**kwargs)
            _FS_CACHE[key] = fs
    return fs


def _gcs_filesystem() -> pafs.FileSystem:
    emulator = _env("STORAGE_EMULATOR_HOST")
    kwargs: dict[str, Any] = {}
    if emulator:
        parsed = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        kwargs = {"anonymous": True, "endpoint_override": parsed.netloc, "scheme": parsed.scheme or "http"}
    return _cached(("gs", tuple(sorted(kwargs.items()))), pafs.GcsFileSystem, kwargs)


def _filesystem_for(
    scheme: str, path: str, s3_endpoint: str | None, s3_region: str | None = None
) -> pafs.FileSystem:
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
    GcsFileSystem and ``bucket/prefix``. ``s3_endpoint`` beats AWS_ENDPOINT_URL_S3, which beats
    AWS_ENDPOINT_URL; ``s3_region`` beats AWS_REGION, then AWS_DEFAULT_REGION, then us-east-1
    when an endpoint is set (with neither, the bucket's region is looked up). Filesystems are
    cached per process and settings. Raises ConfigError for an unsupported scheme.
    """
    scheme, path = split_uri(uri)
    return _filesystem_for(scheme, path, s3_endpoint, s3_region), path


def join_path(folder: str, name: str) -> str:
    """``folder/name`` for a path inside a filesystem (``bucket/prefix`` or an absolute local path):
    the one way paths are joined, for inputs and outputs alike."""
    name = name.lstrip("/")
    return f"{folder.rstrip('/')}/{name}" if folder else name


# --------------------------------------------------------------------------------------------
# Listing inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """One input image: its stable id (the output key) and the URI its bytes are read from."""

    image_id: str
    uri: str


def is_image_path(path: str) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _extensions_text() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def _has_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a path glob, with the semantics of a shell / Python's ``glob``.

    ``*``, ``?`` and ``[...]`` stay within one folder; ``**`` spans folders (``a/**/b`` also
    matches ``a/b``); wildcards never match a name starting with ``.`` unless the pattern spells
    the dot.
    """
    no_dot = r"(?!\.)"
    name = r"[^/]*"
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        at_start = i == 0 or pattern[i - 1] == "/"
        guard = no_dot if at_start else ""
        if c == "*":
            if pattern.startswith("**/", i) and at_start:
                out.append(f"(?:{no_dot}{name}/)*")
                i += 3
            elif pattern.startswith("**", i):
                out.append(f"{guard}{name}(?:/{no_dot}{name})*")
                i += 2
            else:
                out.append(guard + name)
                i += 1
        elif c == "?":
            out.append(guard + "[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j == -1:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : j].replace("\\", "\\\\")
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append(f"{guard}(?!/)[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _list_files(fs: pafs.FileSystem, base: str, uri: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise InputReadError(f"Could not list {uri}: {exc}") from exc
    return [info for info in infos if info.type == pafs.FileType.File]


def _relative(path: str, base: str) -> str:
    if base in ("", "/"):
        return path.lstrip("/")
    return path[len(base) :].lstrip("/")


def _list_glob(scheme: str, path: str, input_uri: str, s3_endpoint: str | None) -> list[InputItem]:
    parts = path.split("/")
    first = next(i for i, part in enumerate(parts) if _has_glob(part))
    if scheme != "local" and first == 0:
        raise ConfigError(f"Globs are not supported in the bucket name: {input_uri}")
    base = "/".join(parts[:first]) or "/"
    fs = _filesystem_for(scheme, path, s3_endpoint)
    regex = _glob_to_regex(path)
    items = [
        InputItem(image_id=_relative(info.path, base), uri=_format_uri(scheme, info.path))
        for info in _list_files(fs, base, input_uri)
        if regex.match(info.path)
    ]
    if not items:
        raise ConfigError(f"No files match the glob {input_uri}")
    return items


def _list_directory(fs: pafs.FileSystem, scheme: str, path: str, input_uri: str) -> list[InputItem]:
    items = []
    for info in _list_files(fs, path, input_uri):
        rel = _relative(info.path, path)
        if any(part.startswith(".") for part in rel.split("/")) or not is_image_path(rel):
            continue
        items.append(InputItem(image_id=rel, uri=_format_uri(scheme, info.path)))
    if not items:
        raise ConfigError(
            f"No images found under {input_uri} (looked recursively for files with extensions "
            f"{_extensions_text()}, case-insensitive)"
        )
    return items


def _resolve_manifest_uri(value: str, scheme: str, folder: str) -> str:
    if "://" in value:
        split_uri(value)  # validates the scheme
        return value
    if value.startswith("/"):
        return value  # an absolute local path
    if scheme == "local":
        return os.path.normpath(os.path.join(folder, value))
    return _format_uri(scheme, posixpath.normpath(posixpath.join(folder, value)))


def _read_manifest_table(fs: pafs.FileSystem, path: str, input_uri: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.lower().endswith(".parquet"):
            schema = pq.read_schema(path, filesystem=fs)
            columns = [c for c in ("uri", "image_id") if c in schema.names]
            if "uri" not in columns:
                raise ConfigError(f"Manifest {input_uri} has no 'uri' column (columns: {schema.names})")
            return pq.read_table(path, filesystem=fs, columns=columns)
        with fs.open_input_stream(path) as stream:
            return pacsv.read_csv(
                stream,
                convert_options=pacsv.ConvertOptions(
                    column_types={"uri": pa.string(), "image_id": pa.string()},
                    strings_can_be_null=True,
                ),
            )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ConfigError(f"Could not parse manifest {input_uri}: {exc}") from exc
    except OSError as exc:
        raise InputReadError(f"Could not read manifest {input_uri}: {exc}") from exc


def _list_manifest(fs: pafs.FileSystem, scheme: str, path: str, input_uri: str) -> list[InputItem]:
    table = _read_manifest_table(fs, path, input_uri)
    if "uri" not in table.column_names:
        raise ConfigError(f"Manifest {input_uri} has no 'uri' column (columns: {table.column_names})")
    uris = table.column("uri").cast(pa.string()).to_pylist()
    if "image_id" in table.column_names:
        try:
            ids: list[Any] = table.column("image_id").cast(pa.string()).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ConfigError(f"Manifest {input_uri}: the image_id column is not text: {exc}") from exc
    else:
        ids = [None] * len(uris)
    has_ids = "image_id" in table.column_names
    if not uris:
        raise ConfigError(f"Manifest {input_uri} has no rows")
    folder = posixpath.dirname(path) if scheme != "local" else os.path.dirname(path)
    items: list[InputItem] = []
    seen: dict[str, int] = {}
    duplicates: list[tuple[str, int, int]] = []
    for row, (raw_uri, raw_id) in enumerate(zip(uris, ids, strict=True), start=1):
        value = (raw_uri or "").strip()
        if not value:
            raise ConfigError(f"Manifest {input_uri}: data row {row} has an empty uri")
        if has_ids:
            image_id = (raw_id or "").strip()
            if not image_id:
                raise ConfigError(f"Manifest {input_uri}: data row {row} has an empty image_id")
        else:
            image_id = value
        if image_id in seen:
            duplicates.append((image_id, seen[image_id], row))
        else:
            seen[image_id] = row
        items.append(InputItem(image_id=image_id, uri=_resolve_manifest_uri(value, scheme, folder)))
    if duplicates:
        image_id, first, again = duplicates[0]
        what = "image_id" if has_ids else "uri (used as image_id)"
        raise ConfigError(
            f"Manifest {input_uri} has {len(duplicates)} duplicate {what} value(s), e.g. {image_id!r} "
            f"in data rows {first} and {again}; image ids must be unique"
        )
    return items


def list_inputs(
    input_uri: str, *, s3_endpoint: str | None = None, limit: int | None = None
) -> list[InputItem]:
    """Every input of ``input_uri`` in a deterministic order (see the module docstring).

    Listings are sorted by uri and ``image_id`` is the path relative to the listing root (the
    glob's folder before its first wildcard; the file name for a single file). Manifests keep
    their row order; ``image_id`` is the ``image_id`` column, else the ``uri`` as written.
    ``limit`` keeps the first N. Raises ConfigError for a missing path, an empty result, a bad
    manifest (no ``uri`` column, empty or duplicate ids) or a bad limit, and InputReadError when
    storage can't be listed.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    scheme, path = split_uri(input_uri)
    if _has_glob(path):
        items = sorted(_list_glob(scheme, path, input_uri, s3_endpoint), key=lambda item: item.uri)
    else:
        fs = _filesystem_for(scheme, path, s3_endpoint)
        try:
            info = fs.get_file_info(path)
        except OSError as exc:
            raise InputReadError(f"Could not access {input_uri}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            if scheme == "local":
                raise ConfigError(f"Input path does not exist: {input_uri}")
            raise ConfigError(
                f"No images found under {input_uri}: nothing exists at that location "
                f"(looked for files with extensions {_extensions_text()})"
            )
        if info.type == pafs.FileType.File:
            suffix = posixpath.splitext(path)[1].lower()
            if suffix in MANIFEST_EXTENSIONS:
                items = _list_manifest(fs, scheme, path, input_uri)
            elif suffix in IMAGE_EXTENSIONS:
                items = [InputItem(image_id=posixpath.basename(path), uri=_format_uri(scheme, path))]
            else:
                raise ConfigError(
                    f"Input file {input_uri} is neither a manifest ({', '.join(sorted(MANIFEST_EXTENSIONS))}) "
                    f"nor an image ({_extensions_text()})"
                )
        else:
            items = sorted(_list_directory(fs, scheme, path, input_uri), key=lambda item: item.uri)
    if limit is not None:
        items = items[:limit]
    logger.info("listed %d input(s) from %s", len(items), input_uri)
    return items


# --------------------------------------------------------------------------------------------
# Reading bytes
# --------------------------------------------------------------------------------------------


_FilesystemGetter = Callable[[str, str], pafs.FileSystem]


def _read(uri: str, get_filesystem: _FilesystemGetter, max_bytes: int | None) -> bytes:
    try:
        scheme, path = split_uri(uri)
        fs = get_filesystem(scheme, path)
        with fs.open_input_stream(path) as stream:
            data = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
    except ConfigError as exc:
        raise InputReadError(f"Could not read {uri!r}: {exc.message}") from exc
    except (OSError, pa.ArrowException) as exc:
        raise InputReadError(f"Could not read {uri}: {type(exc).__name__}: {exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise InputReadError(f"Could not read {uri}: larger than {max_bytes} bytes", code=ErrorCode.TOO_LARGE)
    return bytes(data)


def read_bytes(
    uris: Sequence[str],
    *,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
    threads: int = 8,
    max_bytes: int | None = None,
) -> list[bytes | InputReadError]:
    """The bytes of many objects, read concurrently by ``threads`` threads, in the order of ``uris``.

    Never raises for an input: a missing or unreadable object (or an unsupported URI) gives an
    :class:`InputReadError` in its slot. One filesystem per scheme and bucket is built and reused.
    With ``max_bytes``, larger objects give an InputReadError with code ``too_large`` after reading
    at most ``max_bytes + 1`` bytes.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    if not uris:
        return []
    filesystems: dict[tuple[str, str], pafs.FileSystem] = {}
    lock = threading.Lock()

    def get_filesystem(scheme: str, path: str) -> pafs.FileSystem:
        key = (scheme, path.split("/", 1)[0] if scheme != "local" else "")
        with lock:  # each filesystem is built once, then shared by the threads
            fs = filesystems.get(key)
            if fs is None:
                fs = filesystems[key] = _filesystem_for(scheme, path, s3_endpoint, s3_region)
        return fs

    def one(uri: str) -> bytes | InputReadError:
        try:
            return _read(uri, get_filesystem, max_bytes)
        except InputReadError as exc:
            return exc
        except Exception as exc:  # never raise for one input
            logger.exception("unexpected error reading %s", uri)
            return InputReadError(f"Could not read {uri}: {type(exc).__name__}: {exc}")

    if len(uris) == 1 or threads == 1:
        results = [one(uri) for uri in uris]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(uris)), thread_name_prefix="read") as pool:
            results = list(pool.map(one, uris))
    failed = sum(isinstance(r, InputReadError) for r in results)
    if failed:
        logger.debug("read %d object(s), %d failed", len(results), failed)
    return results


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """A contiguous chunk of the input list: the unit of output files and of resume."""

    index: int
    items: tuple[InputItem, ...]


def _check_shard_size(shard_size: int) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be a positive integer, got {shard_size!r}")


def plan_shards(items: Sequence[InputItem], shard_size: int) -> list[Shard]:
    """``items`` cut into contiguous shards of ``shard_size`` (the last may be shorter), in order."""
    _check_shard_size(shard_size)
    return [
        Shard(index=index, items=tuple(items[start : start + shard_size]))
        for index, start in enumerate(range(0, len(items), shard_size))
    ]


def plan_fingerprint(items: Sequence[InputItem], shard_size: int) -> str:
    """Hex sha256 of the ordered ``(image_id, uri)`` list and ``shard_size``.

    Equal fingerprints mean :func:`plan_shards` gives the same shards, so a resumed job can check
    that it continues the plan it started.
    """
    _check_shard_size(shard_size)
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": _PLAN_VERSION, "shard_size": shard_size}).encode())
    digest.update(b"\n")
    for item in items:
        digest.update(json.dumps([item.image_id, item.uri], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


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
            _parse_endpoint(s3_endpoint, "S3 endpoint")
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"Output location {output_uri} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create the output folder {output_uri}: {exc}") from exc
