"""HTTP plumbing of the endpoint: error → status mapping, bounded body reading, content
negotiation, response encoders, data URLs and the API key check.

Nothing here imports Ray: the functions take Starlette requests and plain arrays, so they are
unit-testable and reusable by clients (``decode_array_payload``/``load_npy`` read what the
server writes). This is the only place where :class:`~pipeline.model.errors.ErrorCode` values
become HTTP status codes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.model.errors import DECODE_ERROR_CODES, ErrorCode, LlavaFeaturesError, RequestError

logger = logging.getLogger(__name__)

NPY_MEDIA_TYPE = "application/x-npy"
JSON_MEDIA_TYPE = "application/json"
RETRY_AFTER_S = 1
"""``Retry-After`` (seconds) sent with every 503."""
MAX_BATCH_ITEMS = 256
"""Most images accepted by one ``/v1/features:batch`` or ``/v1/embeddings`` request."""

# Only deployments/ maps error codes to HTTP statuses; everything not listed is a 500.
_STATUS_BY_CODE: dict[ErrorCode, int] = {
    **{code: 400 for code in DECODE_ERROR_CODES},
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.BODY_TIMEOUT: 408,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
}

# Media types accepted as a raw image body besides image/* (anything else that is not multipart
# is a 415). application/x-www-form-urlencoded is what `curl --data-binary @img.jpg` sends unless
# told otherwise; the decode guard still refuses whatever is not an image.
_RAW_BODY_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")
_BASE64_INVALID = re.compile(r"[^A-Za-z0-9+/=]")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)$", re.DOTALL)


# -- errors ---------------------------------------------------------------------------------


def status_for(code: ErrorCode | str) -> int:
    """HTTP status of an error code (400 for the decode guard's codes, 500 for unknown ones)."""
    try:
        return _STATUS_BY_CODE.get(ErrorCode(code), 500)
    except ValueError:
        return 500


def error_body(code: ErrorCode | str, message: str) -> dict[str, Any]:
    """``{"error": {"code", "message", "type"}}``; ``type`` follows OpenAI's error shape."""
    status = status_for(code)
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"code": str(code), "message": message, "type": kind}}


def error_response(exc: LlavaFeaturesError) -> JSONResponse:
    """The JSON error response of a typed error (``Retry-After`` on 503, ``WWW-Authenticate`` on 401)."""
    status = status_for(exc.code)
    headers: dict[str, str] = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.code, exc.message), status_code=status, headers=headers)


# -- auth ---------------------------------------------------------------------------------


def check_api_key(request: Request, api_key: str | None) -> None:
    """Raise UNAUTHORIZED unless ``api_key`` is unset or the request carries ``Bearer <api_key>``."""
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(
            "Missing or invalid API key (send 'Authorization: Bearer <key>')", code=ErrorCode.UNAUTHORIZED
        )


# -- request bodies ------------------------------------------------------------------------


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _too_large(limit: int) -> RequestError:
    return RequestError(f"Request body exceeds the limit of {limit} bytes", code=ErrorCode.PAYLOAD_TOO_LARGE)


def check_content_length(request: Request, limit: int) -> None:
    """413 from the declared ``Content-Length`` alone, before any byte of the body is read."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError as exc:
        raise RequestError(f"Invalid Content-Length: {declared!r}") from exc
    if size > limit:
        raise _too_large(limit)


async def limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """``request.stream()`` that raises 413 as soon as more than ``limit`` bytes have arrived
    (bodies sent without Content-Length, or with a false one, are never held whole)."""
    check_content_length(request, limit)
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise _too_large(limit)
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 past ``limit`` bytes."""
    chunks = [chunk async for chunk in limited_stream(request, limit)]
    return b"".join(chunks)


async def read_multipart_files(
    request: Request, limit: int, max_files: int = MAX_BATCH_ITEMS
) -> list[tuple[str | None, bytes]]:
    """The file parts of a ``multipart/form-data`` body as ``(filename, bytes)``, in order.

    Parsed while streaming (file parts spool to disk past 1 MiB); non-file fields are ignored.
    """
    parser = MultiPartParser(
        request.headers, limited_stream(request, limit), max_files=max_files, max_fields=max_files
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestError(f"Invalid multipart body: {exc.message}") from exc
    files: list[tuple[str | None, bytes]] = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or None, await value.read()))
    finally:
        await form.close()
    return files


async def read_images(
    request: Request, limit: int, *, max_files: int = MAX_BATCH_ITEMS
) -> list[tuple[str | None, bytes]]:
    """Images of a request: the file parts of a multipart body, or the raw body as one image
    (Content-Type ``image/*``, ``application/octet-stream``, curl's default
    ``application/x-www-form-urlencoded`` or none). Anything else is a 415."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        return await read_multipart_files(request, limit, max_files)
    if kind in _RAW_BODY_TYPES or kind.startswith("image/"):
        return [(None, await read_body(request, limit))]
    raise RequestError(
        f"Unsupported Content-Type {kind!r}: send the image as the raw body (image/*, application/octet-stream) "
        "or as a multipart/form-data file",
        code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    )


async def read_json(request: Request, limit: int) -> Any:
    """A JSON body (Content-Type application/json or none), bounded by ``limit``."""
    kind = media_type(request)
    if kind not in ("", JSON_MEDIA_TYPE) and not kind.endswith("+json"):
        raise RequestError(
            f"Unsupported Content-Type {kind!r}; expected application/json",
            code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"Invalid JSON body: {exc}") from exc
    except RecursionError:
        raise RequestError("Invalid JSON body: nested too deeply") from None


def image_from_data_url(value: Any, where: str = "input") -> bytes:
    """Bytes of a ``data:image/<type>;base64,<data>`` string, strictly: the media type must be an
    image type and the data strict base64 (RFC 4648 alphabet and padding, no whitespace). URLs
    are refused: the server never fetches."""
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string holding a data URL (data:image/png;base64,...)")
    head = value[:16].lower()
    if head.startswith(("http://", "https://")):
        raise RequestError(
            f"{where} is a URL; the server never fetches URLs. Send the image inline as a data URL "
            "(data:image/jpeg;base64,...)"
        )
    match = _DATA_URL.match(value)
    if match is None:
        raise RequestError(f"{where} is not a data URL (expected data:image/...;base64,...)")
    mime = (match["mime"] or "").lower()
    if not mime.startswith("image/"):
        raise RequestError(
            f"{where}: the data URL's media type is {mime or 'missing'!r}; only image types are accepted "
            "(data:image/jpeg;base64,..., data:image/png;base64,...)"
        )
    if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise RequestError(f"{where}: only base64 data URLs are supported (data:image/...;base64,...)")
    data = match["data"]
    bad = _BASE64_INVALID.search(data)
    if bad is not None:
        raise RequestError(
            f"{where}: invalid base64 data: character {bad.group()!r} at position {bad.start()} is not in the "
            "base64 alphabet (A-Z a-z 0-9 + / and = padding; no whitespace)"
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where}: invalid base64 data ({exc})") from exc


# -- responses ------------------------------------------------------------------------------


def choose_format(accept: str | None, override: str | None = None) -> str:
    """``"npy"`` or ``"json"``: the ``format`` query parameter wins, then ``Accept`` (q-values
    honoured), defaulting to npy (also for ``*/*`` and media types we cannot produce)."""
    if override:
        value = override.strip().lower()
        if value in ("npy", NPY_MEDIA_TYPE):
            return "npy"
        if value in ("json", JSON_MEDIA_TYPE):
            return "json"
        raise RequestError(f"Unknown format {override!r}; use 'npy' or 'json'")
    best, best_q = "npy", -1.0
    for position, part in enumerate((accept or "").split(",")):
        fields = [f.strip() for f in part.split(";")]
        kind = fields[0].lower()
        q = 1.0
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        fmt = {NPY_MEDIA_TYPE: "npy", "application/octet-stream": "npy", JSON_MEDIA_TYPE: "json"}.get(kind)
        if fmt is None or q <= 0:
            continue
        if q > best_q or (q == best_q and position == 0):
            best, best_q = fmt, q
    return best


def response_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """The array a response carries for features returned in ``dtype``: bfloat16 (held as its uint16
    bit pattern) is widened to float32, exactly (npy and JSON have no bfloat16); others as they are."""
    if dtype == "bfloat16":
        return (np.asarray(array, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array)


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` of ``array`` (little-endian, C order) into bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """Read an ``application/x-npy`` response."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def array_payload(array: np.ndarray) -> dict[str, Any]:
    """``{"shape", "dtype", "data"}``: ``data`` is base64 of the little-endian C-order bytes."""
    arr = np.ascontiguousarray(array)
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return {
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "data": base64.b64encode(little.tobytes()).decode("ascii"),
    }


def decode_array_payload(payload: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`array_payload` (for clients and tests)."""
    dtype = np.dtype(payload["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(payload["data"]), dtype=dtype).reshape(payload["shape"])


def safe_header(value: object) -> str:
    """A header value that survives latin-1 encoding (non-latin-1 characters are escaped)."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    return text.encode("latin-1", "backslashreplace").decode("latin-1")


def npy_response(array: np.ndarray, headers: dict[str, str]) -> Response:
    return Response(
        npy_bytes(array), media_type=NPY_MEDIA_TYPE, headers={k: safe_header(v) for k, v in headers.items()}
    )


def embeddings_body(vectors: Sequence[np.ndarray], model: str, encoding_format: str) -> dict[str, Any]:
    """OpenAI's ``CreateEmbeddingResponse``: ``float`` lists, or ``base64`` of float32 little-endian bytes."""
    data = []
    for index, vector in enumerate(vectors):
        vec = np.asarray(vector, dtype="<f4")
        embedding: Any = (
            base64.b64encode(vec.tobytes()).decode("ascii") if encoding_format == "base64" else vec.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def embedding_inputs(body: Any) -> tuple[list[Any], str, str | None]:
    """Validate an OpenAI embeddings request body → (inputs, encoding_format, model)."""
    if not isinstance(body, dict):
        raise RequestError('The body must be a JSON object like {"model": ..., "input": [...]}')
    raw = body.get("input")
    inputs: list[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    if not inputs:
        raise RequestError("'input' must be a data URL string or a non-empty list of them")
    if len(inputs) > MAX_BATCH_ITEMS:
        raise RequestError(f"Too many inputs: {len(inputs)} > {MAX_BATCH_ITEMS}")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise RequestError(f"Unknown encoding_format {encoding_format!r}; use 'float' or 'base64'")
    model = body.get("model")
    return inputs, encoding_format, model if isinstance(model, str) else None
