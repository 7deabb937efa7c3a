"""The one row model of the feature table: what it records of each input besides its features.

An :class:`InputRows` holds one data file's inputs in input order. The decode stage fills it (an input
it decoded, or one that failed and why), it travels to the encoder inside a
:class:`~pipeline.records.DecodedShard`, the encoder may turn an input into an error (device decode),
and :func:`pipeline.table.files.build_batch` turns it into the file's columns.

One convention for what is missing, everywhere: ``None`` for text (an ok input has no error code or
message), ``0`` for a size that is not known (an image has at least one pixel per side), ``None``
for a carried value the input does not have. In the table these are all nulls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from ..storage.names import name_text

__all__ = ["STATUSES", "STATUS_ERROR", "STATUS_OK", "InputRows", "Status"]

Status = Literal["ok", "error"]
"""``status`` of a row: its image was encoded, or its input failed (``error_code`` says why)."""
STATUSES: tuple[str, ...] = get_args(Status)
STATUS_OK: Status = "ok"
STATUS_ERROR: Status = "error"


@dataclass
class InputRows:
    """Per-input values of one data file, one list entry per input, in input order."""

    image_id: list[str] = field(default_factory=list)
    """Each input's id (the table's key)."""
    uri: list[str] = field(default_factory=list)
    """Where each input was read from."""
    ok: list[bool] = field(default_factory=list)
    """Whether each input was decoded (and then encoded)."""
    width: list[int] = field(default_factory=list)
    """Width of each decoded image (0 where unknown)."""
    height: list[int] = field(default_factory=list)
    """Height of each decoded image (0 where unknown)."""
    error_code: list[str | None] = field(default_factory=list)
    """Each failed input's stable error code (None where ok)."""
    error_message: list[str | None] = field(default_factory=list)
    """Each failed input's reason (None where ok)."""
    carried: dict[str, list[Any]] = field(default_factory=dict)
    """Carried columns (``input.keep_columns``): ``{column: one value per input}`` (None where missing)."""

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def ok_mask(self) -> np.ndarray:
        """(n,) bool, True for the inputs that were encoded."""
        return np.asarray(self.ok, dtype=bool).reshape(-1)

    @property
    def num_ok(self) -> int:
        return int(sum(self.ok))

    def statuses(self) -> list[Status]:
        return [STATUS_OK if ok else STATUS_ERROR for ok in self.ok]

    def add_ok(
        self,
        image_id: str,
        uri: str,
        *,
        width: int = 0,
        height: int = 0,
        carried: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an input that was decoded."""
        self._add(image_id, uri, ok=True, size=(width, height), error=(None, None), carried=carried)

    def add_error(
        self, image_id: str, uri: str, *, code: str, message: str, carried: Mapping[str, Any] | None = None
    ) -> None:
        """Append an input that failed with an error ``code`` (an :class:`ErrorCode` value)."""
        self._add(image_id, uri, ok=False, size=(0, 0), error=(str(code), message), carried=carried)

    def mark_error(self, index: int, *, code: str, message: str) -> None:
        """Turn input ``index`` into a failure (it was read, but the encoder could not decode it)."""
        self.ok[index] = False
        self.width[index] = self.height[index] = 0
        self.error_code[index], self.error_message[index] = str(code), name_text(message)

    def set_size(self, index: int, width: int, height: int) -> None:
        """Record input ``index``'s image size (known once it is decoded)."""
        self.width[index], self.height[index] = int(width), int(height)

    def _add(
        self,
        image_id: str,
        uri: str,
        *,
        ok: bool,
        size: tuple[int, int],
        error: tuple[str | None, str | None],
        carried: Mapping[str, Any] | None,
    ) -> None:
        n = len(self.image_id)
        for name, value in (carried or {}).items():
            self.carried.setdefault(name, [None] * n).append(value)
        for values in self.carried.values():  # a column this input has no value for
            if len(values) == n:
                values.append(None)
        # Text columns are UTF-8: a name that is not (a POSIX file name, a tar member) is kept escaped.
        self.image_id.append(name_text(image_id))
        self.uri.append(name_text(uri))
        self.ok.append(bool(ok))
        self.width.append(int(size[0]))
        self.height.append(int(size[1]))
        self.error_code.append(error[0])
        self.error_message.append(name_text(error[1]) if error[1] is not None else None)

    def error_counts(self) -> dict[str, int]:
        """Failed inputs by error code."""
        counts: dict[str, int] = {}
        for ok, code in zip(self.ok, self.error_code, strict=True):
            if not ok:
                counts[str(code)] = counts.get(str(code), 0) + 1
        return counts

    def validate(self) -> None:
        """ValueError unless the lists line up and each row is either ok or has an error code."""
        n = len(self.image_id)
        for name in ("uri", "ok", "width", "height", "error_code", "error_message"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"InputRows.{name} has {len(getattr(self, name))} entries, image_id has {n}")
        for name, values in self.carried.items():
            if len(values) != n:
                raise ValueError(f"carried column {name!r} has {len(values)} entries, image_id has {n}")
        for i, (ok, code) in enumerate(zip(self.ok, self.error_code, strict=True)):
            if ok == (code is not None):
                raise ValueError(
                    f"row {i} ({self.image_id[i]!r}): an ok row has no error_code, an error row has one"
                )
        missing = [i for i, v in enumerate(self.image_id) if v is None]
        if missing:
            raise ValueError(f"row {missing[0]} has no image_id")
