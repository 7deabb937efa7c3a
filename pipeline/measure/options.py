"""The base of every benchmark's options: a frozen dataclass whose fields are checked when it is built.

Each benchmark takes one options dataclass (defaults, a one-line doc per field), built by the command
line from its flags and ``--opt KEY=VALUE``; the fields are checked against their annotations and ranges
as the config sections are (:func:`pipeline.model.config.check_section`), with errors that name the key
(``bench.sink.rows: expected an integer, got 'many'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..model.config import check_section

__all__ = ["BenchOptions"]


@dataclass(frozen=True)
class BenchOptions:
    """Options of one benchmark (subclassed by each); ``SECTION`` prefixes the errors' keys."""

    SECTION: ClassVar[str] = "bench"

    def __post_init__(self) -> None:
        check_section(self)
