"""A racer for the claim race of tests/test_delta_stores.py, in a module light enough to import quickly.

Each racer is a spawned process (forking after deltalake is imported deadlocks), which imports
the module of its target: this one needs only pyarrow and deltalake, where the test module pulls
in the product (and torch) and took seconds per racer.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from deltalake import Schema
from deltalake.transaction import CommitProperties, create_table_with_add_actions

ARROW_SCHEMA = pa.schema([("image_id", pa.string()), ("value", pa.int64())])


def claim(location: str, options: dict[str, str], writer: int, barrier: Any, results: Any) -> None:
    """Create the table at ``location`` once ``barrier`` releases every racer; put ``(writer, error or None)``."""
    try:
        barrier.wait(timeout=60)
        create_table_with_add_actions(
            location,
            Schema.from_arrow(ARROW_SCHEMA),
            [],
            mode="error",
            storage_options=options,
            commit_properties=CommitProperties(max_commit_retries=0, custom_metadata={"writer": str(writer)}),
        )
    except Exception as exc:
        results.put((writer, f"{type(exc).__name__}: {exc}"))
    else:
        results.put((writer, None))
