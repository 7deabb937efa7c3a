"""The typed record of the offline job's Ray Data hop (``pipeline/records.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.records import DecodedShard, rows_of_batch, rows_to_batch


def _record(shard: int, n_ok: int, n_err: int, *, data: bool = False) -> DecodedShard:
    record = DecodedShard(shard=shard, data=[] if data else None)
    pixels = []
    for i in range(n_ok + n_err):
        if (i % 2 == 0 and i // 2 < n_ok) or i >= 2 * n_err:
            record.add_ok(f"img-{shard}-{i}", f"/in/{i}.jpg", 40 + i, 30 + i)
            pixels.append(np.full((3, 4, 5), i, np.uint8))
            if data:
                record.data.append(bytes([i]) * (i + 1))  # type: ignore[union-attr]
        else:
            record.add_error(f"img-{shard}-{i}", f"/in/{i}.jpg", "corrupt", f"bad {i}")
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
    assert back.shard == 7 and back.image_id == want.image_id and back.uri == want.uri
    assert back.error_code == want.error_code and back.error_message == want.error_message
    np.testing.assert_array_equal(back.ok, want.ok)
    np.testing.assert_array_equal(back.width, want.width)
    np.testing.assert_array_equal(back.pixels, want.pixels)
    assert back.num_ok == n_ok and back.statuses().count("ok") == n_ok
    assert back.data == want.data


def test_inconsistent_records_are_refused():
    record = _record(0, 2, 1)
    record.pixels = record.pixels[:1]
    with pytest.raises(ValueError, match="pixels must be uint8"):
        record.to_row()
    record = _record(0, 2, 1)
    record.uri.append("extra")
    with pytest.raises(ValueError, match="uri has 4 entries"):
        record.validate()


def test_per_input_columns_of_a_record_read_back_are_writable():
    """Ray Data hands out read-only buffers; the encode stage updates ok/width/height in place."""
    row = _record(1, 2, 1).to_row()
    for name in ("ok", "width", "height"):
        row[name].setflags(write=False)
    back = DecodedShard.from_row(row)
    back.ok[0], back.width[0] = False, 7
    assert not back.ok[0] and back.width[0] == 7
