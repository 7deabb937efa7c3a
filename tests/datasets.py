"""Generated datasets in the layouts users have: WebDataset tar shards, Parquet files with image bytes
(the Hugging Face ``datasets`` Image struct or plain binary), sharded manifests. Real photos from
``tests/corpus.py``; everything is written locally (or uploaded by the tests' S3/GCS servers).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tests.corpus import encode, real_photos

__all__ = ["photo_bytes", "tar_bytes", "truncate_inside_last_member", "write_image_parquet", "write_shards"]


def photo_bytes(n: int, fmt: str = "JPEG") -> list[bytes]:
    """``n`` encoded real photos (cycling through scikit-image's), small enough for quick tests."""
    from PIL import Image

    photos = list(real_photos().values())
    out = []
    for i in range(n):
        image = Image.fromarray(photos[i % len(photos)])
        image.thumbnail((96, 96))
        out.append(encode(image, fmt))
    return out


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar archive holding ``members`` ``(name, data)`` in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(
    key: str,
    image: bytes | None,
    *,
    caption: str | None = None,
    meta: dict[str, Any] | None = None,
    ext: str = "jpg",
) -> list[tuple[str, bytes]]:
    """The members of one WebDataset sample, as img2dataset writes them (``key.jpg``, ``.txt``, ``.json``)."""
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def write_shards(folder: Path, shards: int, per_shard: int, *, start: int = 0) -> dict[str, dict[str, Any]]:
    """``shards`` tars ``folder/{start:05d}.tar``... of ``per_shard`` samples each (photo, caption, json
    with ``url`` and ``key``). Returns ``{image_id: {"caption", "url", "tar", "member"}}``."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = photo_bytes(min(8, per_shard * shards))
    expected: dict[str, dict[str, Any]] = {}
    for s in range(start, start + shards):
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            caption, url = f"a photo number {i} of shard {s}", f"https://example.com/{key}.jpg"
            members += sample_members(
                key, photos[(s * per_shard + i) % len(photos)], caption=caption, meta={"key": key, "url": url}
            )
            expected[key] = {"caption": caption, "url": url, "tar": f"{s:05d}.tar", "member": f"{key}.jpg"}
        (folder / f"{s:05d}.tar").write_bytes(tar_bytes(members))
    return expected


def truncate_inside_last_member(data: bytes) -> bytes:
    """``data`` (a tar) cut in the middle of its last member's data."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmembers()[-1]
    return data[: last.offset_data + last.size // 2]


def write_image_parquet(
    path: Path,
    images: Sequence[bytes | None],
    *,
    struct: bool = True,
    ids: Sequence[str] | None = None,
    columns: dict[str, list[Any]] | None = None,
    row_group_size: int | None = None,
) -> Path:
    """A Parquet file of images: column ``image`` as the ``datasets`` Image struct ``{bytes, path}``
    (or plain binary), optional ``id`` column and extra columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if struct:
        image = pa.array(
            [{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(images)],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        image = pa.array(list(images), pa.binary())
    data: dict[str, Any] = {"image": image}
    if ids is not None:
        data["id"] = list(ids)
    data.update(columns or {})
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)
    return path
