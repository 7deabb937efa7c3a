"""The typed records of the offline job's Ray hops (``pipeline/records.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.records import DecodedShard, ShardSummary, rows_of_batch, rows_to_batch
from pipeline.table import DataFile


def _record(shard: int, n_ok: int, n_err: int, *, data: bool = False) -> DecodedShard:
    record = DecodedShard(shard=shard, key="ab" * 32, piece=2, last=False, data=[] if data else None)
    pixels = []
    for i in range(n_ok + n_err):
        if (i % 2 == 0 and i // 2 < n_ok) or i >= 2 * n_err:
            record.add_ok(
                f"img-{shard}-{i}", f"/in/{i}.jpg", width=40 + i, height=30 + i, carried={"caption": f"c{i}"}
            )
            pixels.append(np.full((3, 4, 5), i, np.uint8))
            if data:
                record.data.append(bytes([i]) * (i + 1))  # type: ignore[union-attr]
        else:
            record.add_error(f"img-{shard}-{i}", f"/in/{i}.jpg", code="corrupt", message=f"bad {i}")
    record.pixels = np.zeros((0, 3, 4, 5), np.uint8) if data or not pixels else np.stack(pixels)
    return record


@pytest.mark.parametrize(
    ("n_ok", "n_err", "data"), [(3, 2, False), (0, 4, False), (2, 0, False), (2, 1, True)]
)
def test_round_trip_through_a_numpy_batch(n_ok, n_err, data):
    records = [_record(7, n_ok, n_err, data=data)]
    batch = rows_to_batch([r.to_row() for r in records])
    assert batch["pixels"].dtype == np.uint8 and batch["pixels"].shape[0] == 1  # a tensor column, not pickles
    assert batch["image_id"].dtype == object and isinstance(batch["image_id"][0], list)
    (back,) = [DecodedShard.from_row(row) for row in rows_of_batch(batch)]
    want = records[0]
    assert (back.shard, back.key, back.piece, back.last) == (7, "ab" * 32, 2, False)
    assert back.rows.image_id == want.rows.image_id and back.rows.uri == want.rows.uri
    # one convention for what is missing: None for an ok row's error, a carried value it lacks
    assert back.rows.error_code == want.rows.error_code
    assert all(code is None for code, ok in zip(back.rows.error_code, back.rows.ok, strict=True) if ok)
    assert back.rows.error_message == want.rows.error_message
    assert back.rows.ok == want.rows.ok and back.rows.width == want.rows.width
    assert back.rows.carried == want.rows.carried
    np.testing.assert_array_equal(back.pixels, want.pixels)
    assert back.num_ok == n_ok and back.rows.statuses().count("ok") == n_ok
    assert back.data == want.data
    assert back.rows.error_counts() == ({"corrupt": n_err} if n_err else {})


def test_inconsistent_records_are_refused():
    record = _record(0, 2, 1)
    record.pixels = record.pixels[:1]
    with pytest.raises(ValueError, match="pixels must be uint8"):
        record.to_row()
    record = _record(0, 2, 1)
    record.rows.uri.append("extra")
    with pytest.raises(ValueError, match="uri has 4 entries"):
        record.validate()
    record = _record(0, 2, 1)
    record.rows.error_code[0] = "corrupt"  # an ok row with an error code
    with pytest.raises(ValueError, match="an ok row has no error_code"):
        record.validate()


def test_device_decode_failures_become_error_rows_in_place():
    """Ray Data hands out read-only buffers; the encode stage turns inputs into errors and sets sizes."""
    row = _record(1, 2, 1).to_row()
    for name in ("ok", "width", "height"):
        row[name].setflags(write=False)
    back = DecodedShard.from_row(row)
    back.rows.mark_error(0, code="truncated", message="cut")
    back.rows.set_size(2, 7, 9)
    assert back.rows.ok[0] is False and back.rows.error_code[0] == "truncated" and back.rows.width[0] == 0
    assert (back.rows.width[2], back.rows.height[2]) == (7, 9)


def test_summary_round_trip_carries_the_data_file():
    file = DataFile(
        "part-x.parquet",
        1234,
        5,
        {"error_code": 3, "image_id": 0, "width": 2},
        {"image_id": ("a", "e")},
        {"width": (3, 40)},
        99,
    )
    summaries = [
        ShardSummary(shard=3, piece=1, last=True, rows=5, ok=3, errors={"corrupt": 2}, file=file),
        ShardSummary(shard=4, piece=0, last=True, rows=0, ok=0),
    ]
    batch = rows_to_batch([s.to_row() for s in summaries])
    back = [ShardSummary.from_row(row) for row in rows_of_batch(batch)]
    assert back == summaries
    assert back[0].file.ok == 3 and back[0].file.stats() == {
        "numRecords": 5,
        "nullCount": {"error_code": 3, "image_id": 0, "width": 2},
        "minValues": {"image_id": "a", "width": 3},
        "maxValues": {"image_id": "e", "width": 40},
    }
