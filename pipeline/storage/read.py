"""Reading objects, never blocking for longer than ``job.read_timeout_s`` and never opening what is not a
regular file.

- :func:`read_bytes`: whole objects (images), many at once on a pool of threads; every failure,
  including a read that takes longer than the timeout, is an :class:`InputReadError` in its slot.
- :func:`open_input`: a binary stream over one object (a tar, a Parquet file) whose every read
  waits at most the timeout (:class:`TimedStream`).
- Local paths are opened with ``O_NONBLOCK`` and checked with ``fstat`` before any byte is read:
  a FIFO, a socket or a device gives an error (``read_failed``) instead of a read that never
  returns; a dangling link or a link loop says so.

A read that times out leaves its thread blocked (Python cannot interrupt a blocking call); the
threads are daemons, replaced by fresh ones, and end whenever the call returns.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from ..model.errors import ConfigError, ErrorCode, InputReadError
from .fs import filesystem_for, split_uri

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_STREAM_CHUNK = 1 << 20  # bytes per read of a TimedStream's underlying stream


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def special_file_reason(path: str) -> str | None:
    """Why the local ``path`` is no readable regular file (without opening it); None when it is one."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return _os_error_reason(path, exc)
    if stat.S_ISREG(st.st_mode):
        return None
    return f"{_kind_of(st.st_mode)}, not a regular file"


def _os_error_reason(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"a dangling symbolic link (to {os.readlink(path)!r})"
    if exc.errno == errno.ENXIO:
        return "a socket or device without a reader, not a regular file"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def open_local(path: str) -> io.BufferedReader:
    """A regular local file opened for reading; raises InputReadError for anything else, which is
    never opened (``stat`` first; should it change meanwhile, the non-blocking open and ``fstat``
    still refuse it without waiting on a FIFO)."""
    reason = special_file_reason(path)
    if reason is not None:
        raise InputReadError(f"Could not read {path}: {reason}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputReadError(f"Could not read {path}: {_os_error_reason(path, exc)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputReadError(f"Could not read {path}: {_kind_of(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=_STREAM_CHUNK)
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------------------------
# Timed calls
# --------------------------------------------------------------------------------------------


class _Slot:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


_STOP = object()


class TimedCaller:
    """Runs calls on one daemon thread and waits at most ``timeout_s`` for each (None: no limit).

    A call that takes longer raises :class:`InputReadError` (``read_failed``, the message says
    ``timed out``); its thread is abandoned and the next call gets a fresh one.
    """

    def __init__(self, timeout_s: float | None, what: str) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self._queue: queue.SimpleQueue[Any] | None = None

    def _worker(self) -> queue.SimpleQueue[Any]:
        if self._queue is None:
            q: queue.SimpleQueue[Any] = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(q,), daemon=True, name="timed-read").start()
            self._queue = q
        return self._queue

    def __call__(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self.timeout_s is None:
            return fn(*args)
        slot = _Slot()
        q = self._worker()
        q.put((fn, args, slot))
        if not slot.done.wait(self.timeout_s):
            q.put(_STOP)  # the thread ends once the blocked call returns
            self._queue = None
            raise InputReadError(
                f"Could not read {self.what}: timed out after {self.timeout_s:g} s (job.read_timeout_s)"
            )
        if slot.error is not None:
            raise slot.error
        return slot.value  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(_STOP)
            self._queue = None


def _serve(q: queue.SimpleQueue[Any]) -> None:
    while True:
        task = q.get()
        if task is _STOP:
            return
        fn, args, slot = task
        try:
            slot.value = fn(*args)
        except BaseException as exc:
            slot.error = exc
        slot.done.set()


class TimedStream(io.RawIOBase):
    """A read-only binary stream whose every read of the underlying stream waits at most ``timeout_s``.

    Wrap it in :class:`io.BufferedReader` (as :func:`open_input` does) so that small reads
    (``tarfile`` reads 512-byte headers) do not each cost a thread hop.
    """

    def __init__(self, raw: Any, timeout_s: float | None, what: str) -> None:
        super().__init__()
        self._raw = raw
        self._call = TimedCaller(timeout_s, what)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._call(self._raw.read, len(buffer))
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._call.close()
            try:
                self._raw.close()
            except Exception:  # closing a stream after a failed read may fail again
                logger.debug("closing %s failed", self._call.what, exc_info=True)
        super().close()


def open_input(
    uri: str,
    *,
    s3_endpoint: str | None = None,
    timeout_s: float | None = None,
    random_access: bool = False,
) -> Any:
    """A binary stream over the object at ``uri`` (a local regular file, or an s3/gs object).

    Sequential streams (the default) are :class:`TimedStream` s behind a 1 MiB buffer: each read
    of the store waits at most ``timeout_s``. ``random_access=True`` returns a seekable file
    (a local file object, or pyarrow's ``open_input_file`` for object stores: Parquet needs its
    footer first), with the same timeout on every read. Raises InputReadError when the object
    cannot be opened.
    """
    try:
        scheme, path = split_uri(uri)
    except ConfigError as exc:
        raise InputReadError(f"Could not read {uri!r}: {exc.message}") from exc
    call = TimedCaller(timeout_s, uri)
    try:
        if scheme == "local":
            raw: Any = call(open_local, path)
            if random_access:
                return _TimedFile(raw, call)
        else:
            fs = filesystem_for(scheme, path, s3_endpoint)
            if random_access:
                return _TimedFile(call(fs.open_input_file, path), call)
            raw = call(fs.open_input_stream, path)
    except InputReadError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise InputReadError(f"Could not read {uri}: {type(exc).__name__}: {exc}") from exc
    return io.BufferedReader(TimedStream(raw, timeout_s, uri), buffer_size=_STREAM_CHUNK)


class _TimedFile(io.RawIOBase):
    """A seekable file whose reads and seeks go through a :class:`TimedCaller`."""

    def __init__(self, raw: Any, call: TimedCaller) -> None:
        super().__init__()
        self._raw = raw
        self._call = call

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._call(self._raw.seek, offset, whence))

    def tell(self) -> int:
        return int(self._raw.tell())

    def size(self) -> int:
        if hasattr(self._raw, "size"):
            return int(self._call(self._raw.size))
        return int(os.fstat(self._raw.fileno()).st_size)

    def readinto(self, buffer: Any) -> int:
        data = self._call(self._raw.read, len(buffer))
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        return n

    def read(self, size: int = -1) -> bytes:
        return bytes(self._call(self._raw.read, size) if size is not None and size >= 0 else self.readall())

    def readall(self) -> bytes:
        return bytes(self._call(self._raw.read))

    def close(self) -> None:
        if not self.closed:
            self._call.close()
            try:
                self._raw.close()
            except Exception:
                logger.debug("closing %s failed", self._call.what, exc_info=True)
        super().close()


# --------------------------------------------------------------------------------------------
# Whole objects, many at once
# --------------------------------------------------------------------------------------------


_FilesystemGetter = Callable[[str, str], pafs.FileSystem]


def _read(uri: str, get_filesystem: _FilesystemGetter, max_bytes: int | None) -> bytes:
    try:
        scheme, path = split_uri(uri)
        if scheme == "local":
            with open_local(path) as f:
                data: Any = f.read() if max_bytes is None else f.read(max_bytes + 1)
        else:
            fs = get_filesystem(scheme, path)
            with fs.open_input_stream(path) as stream:
                data = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
    except ConfigError as exc:
        raise InputReadError(f"Could not read {uri!r}: {exc.message}") from exc
    except InputReadError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise InputReadError(f"Could not read {uri}: {type(exc).__name__}: {exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise InputReadError(f"Could not read {uri}: larger than {max_bytes} bytes", code=ErrorCode.TOO_LARGE)
    return bytes(data)


class _Pool:
    """``threads`` daemon threads running ``fn`` over items, each call limited to ``timeout_s``.

    A call past its time gives an InputReadError in its slot; its thread is written off and a
    new one takes its place, so stuck reads never stall the others.
    """

    def __init__(self, fn: Callable[[str], Any], items: Sequence[str], threads: int, timeout_s: float | None):
        self.fn, self.items, self.timeout_s = fn, items, timeout_s
        self.results: list[Any] = [None] * len(items)
        self.done = [False] * len(items)
        self.started: dict[int, float] = {}
        self.next = 0
        self.cond = threading.Condition()
        self.threads = min(threads, len(items))

    def _work(self) -> None:
        while True:
            with self.cond:
                if self.next >= len(self.items):
                    return
                i = self.next
                self.next += 1
                self.started[i] = time.monotonic()
            try:
                value = self.fn(self.items[i])
            except BaseException as exc:  # fn never raises for an input; this is a bug
                value = InputReadError(f"Could not read {self.items[i]}: {type(exc).__name__}: {exc}")
            with self.cond:
                if self.done[i]:  # timed out meanwhile: this thread was replaced
                    return
                self.results[i] = value
                self.done[i] = True
                self.started.pop(i, None)
                self.cond.notify_all()

    def _spawn(self) -> None:
        threading.Thread(target=self._work, daemon=True, name="read").start()

    def run(self) -> list[Any]:
        for _ in range(self.threads):
            self._spawn()
        with self.cond:
            while not all(self.done):
                now = time.monotonic()
                wait = None
                if self.timeout_s is not None:
                    for i, t0 in list(self.started.items()):
                        left = t0 + self.timeout_s - now
                        if left <= 0:
                            self.results[i] = InputReadError(
                                f"Could not read {self.items[i]}: timed out after {self.timeout_s:g} s "
                                "(job.read_timeout_s)"
                            )
                            self.done[i] = True
                            del self.started[i]
                            self._spawn()
                        else:
                            wait = left if wait is None else min(wait, left)
                if all(self.done):
                    break
                self.cond.wait(timeout=wait if wait is not None else 1.0)
        return self.results


def read_bytes(
    uris: Sequence[str],
    *,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
    threads: int = 8,
    max_bytes: int | None = None,
    timeout_s: float | None = None,
) -> list[bytes | InputReadError]:
    """The bytes of many objects, read concurrently by ``threads`` threads, in the order of ``uris``.

    Never raises for an input: a missing or unreadable object (or an unsupported URI, a local
    FIFO/socket/device, a dangling link) gives an :class:`InputReadError` in its slot, and so
    does a read that takes longer than ``timeout_s``. One filesystem per scheme and bucket is
    built and reused. With ``max_bytes``, larger objects give an InputReadError with code
    ``too_large`` after reading at most ``max_bytes + 1`` bytes.
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
                fs = filesystems[key] = filesystem_for(scheme, path, s3_endpoint, s3_region)
        return fs

    def one(uri: str) -> bytes | InputReadError:
        try:
            return _read(uri, get_filesystem, max_bytes)
        except InputReadError as exc:
            return exc
        except Exception as exc:  # never raise for one input
            logger.exception("unexpected error reading %s", uri)
            return InputReadError(f"Could not read {uri}: {type(exc).__name__}: {exc}")

    if timeout_s is None and (len(uris) == 1 or threads == 1):
        results = [one(uri) for uri in uris]
    else:
        results = _Pool(one, uris, threads, timeout_s).run()
    failed = sum(isinstance(r, InputReadError) for r in results)
    if failed:
        logger.debug("read %d object(s), %d failed", len(results), failed)
    return results
