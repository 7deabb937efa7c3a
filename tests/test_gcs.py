"""pipeline.storage and pipeline.table on ``gs://``, against a real GCS server.

The server is gcp-storage-emulator, started by the ``gcs_server`` fixture (tests/fixtures/gcs.py)
on 127.0.0.1; ``gcs_env`` points ``STORAGE_EMULATOR_HOST`` at it for one test. Everything goes
through the product's own functions; the fixture's helpers (plain JSON-API requests) only put
objects in place and look at what the product left behind.

The table's data files go through pyarrow's GCS client; its log goes through delta-rs, which speaks
GCS's XML API: the fixture serves that API from the emulator's storage (tests/fixtures/gcs_xml.py).
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.model.errors import ConfigError, ErrorCode, InputReadError, OutputError
from pipeline.offline.ray_runtime import FORWARDED_ENV
from pipeline.storage import (
    InputItem,
    ensure_output_dir,
    list_inputs,
    output_is_empty,
    read_bytes,
    resolve_filesystem,
)
from pipeline.table import (
    SUCCESS_FILE,
    InputRows,
    PlannedUnit,
    RunPlan,
    TableIdentity,
    TableLocation,
    TableSpec,
    TableWriter,
    TensorSpec,
    build_batch,
    read_features,
)
from pipeline.table.files import write_data_file
from pipeline.table.layout import DataFileName
from tests.fixtures.gcs import GcsServer
from tests.fixtures.ray_cluster import local_ray

File, Directory = pafs.FileType.File, pafs.FileType.Directory


def _options(fs: pafs.FileSystem) -> dict[str, Any]:
    """The options a GcsFileSystem was built with (what it pickles); no request is sent."""
    return dict(fs.__reduce__()[1][0])


def _items(bucket: str, base: str, *rels: str) -> list[InputItem]:
    return [InputItem(image_id=rel, uri=f"gs://{bucket}/{base}/{rel}") for rel in rels]


# ------------------------------------------------------------------------------------------
# The fixture: a faithful, fast server
# ------------------------------------------------------------------------------------------


def test_helpers_round_trip(gcs_server: GcsServer) -> None:
    bucket = gcs_server.create_bucket()
    assert gcs_server.create_bucket(bucket) == bucket  # idempotent
    assert gcs_server.put_object(bucket, "a/b c+d#e.bin", b"\x00payload") == f"gs://{bucket}/a/b c+d#e.bin"
    gcs_server.put_object(bucket, "a/empty.bin", b"")
    gcs_server.put_object(bucket, "ab/text.txt", "text")
    assert gcs_server.list_keys(bucket) == ["a/b c+d#e.bin", "a/empty.bin", "ab/text.txt"]
    assert gcs_server.list_keys(bucket, "a/") == ["a/b c+d#e.bin", "a/empty.bin"]

    fs = gcs_server.filesystem()
    with fs.open_input_stream(f"{bucket}/a/b c+d#e.bin") as stream:
        assert stream.read() == b"\x00payload"
    # A random-access read: this one would deadlock with the emulator inside the test process.
    with fs.open_input_file(f"{bucket}/a/b c+d#e.bin") as f:
        assert f.size() == 8
        assert f.read_at(7, 1) == b"payload"
    with fs.open_input_stream(f"{bucket}/a/empty.bin") as stream:
        assert stream.read() == b""
    other = gcs_server.create_bucket()
    with fs.open_output_stream(f"{other}/written.bin") as out:  # a resumable upload
        out.write(b"x" * (600 * 1024))  # more than one 256 KiB chunk
    assert gcs_server.list_keys(other) == ["written.bin"]
    fs.create_dir(f"made-by-pyarrow-{other}")  # needs the filesystem's project id
    assert fs.get_file_info(f"made-by-pyarrow-{other}").type == Directory


def test_non_recursive_listing_follows_gcs(gcs_server: GcsServer) -> None:
    """Sub-folder markers are directories (includeTrailingDelimiter); implied sub-folders are not listed."""
    fs = gcs_server.filesystem()
    bucket = gcs_server.create_bucket()
    fs.create_dir(f"{bucket}/d/marked", recursive=True)
    gcs_server.put_object(bucket, "d/file.bin", b"1")
    gcs_server.put_object(bucket, "d/implied/x.bin", b"2")
    assert gcs_server.list_keys(bucket) == ["d/", "d/file.bin", "d/implied/x.bin", "d/marked/"]
    infos = fs.get_file_info(pafs.FileSelector(f"{bucket}/d"))
    assert sorted((i.path, i.type) for i in infos) == [
        (f"{bucket}/d/file.bin", File),
        (f"{bucket}/d/marked", Directory),
    ]


def test_emulator_errors_fail_fast(gcs_server: GcsServer) -> None:
    """A crashing handler or an unimplemented route answers 400, which clients do not retry."""
    bucket = gcs_server.create_bucket()
    status, body = gcs_server.request(
        "POST", f"/upload/storage/v1/b/{bucket}/o", query={"uploadType": "media", "name": "x"}, body=b""
    )
    assert status == 400
    assert b"TypeError" in body
    assert gcs_server.request("PUT", "/storage/v1/b")[0] == 400  # 501 from the emulator


def _xml_path(bucket: str, key: str = "") -> str:
    """An XML-API path as object_store spells it: every non-alphanumeric byte percent-encoded."""
    return f"/{quote(bucket, safe='')}/{quote(key, safe='')}" if key else f"/{quote(bucket, safe='')}"


def test_xml_api_objects(gcs_server: GcsServer) -> None:
    """The XML API object_store uses, over the JSON API's storage: uploads, reads, copies, deletes."""
    bucket = gcs_server.create_bucket()
    key = "t/_delta_log/00000000000000000000.json"
    create = {"x-goog-if-generation-match": "0", "Content-Type": "application/octet-stream"}
    status, headers, _ = gcs_server.exchange(
        "PUT", _xml_path(bucket, key), body=b"0123456789", headers=create
    )
    assert status == 200
    generation = headers["x-goog-generation"]
    assert headers["etag"] == f'"{hashlib.md5(b"0123456789").hexdigest()}"'
    # Create-if-absent: a second creator is refused, and the object is left as it was.
    assert gcs_server.exchange("PUT", _xml_path(bucket, key), body=b"other", headers=create)[0] == 412
    assert gcs_server.list_keys(bucket) == [key]  # the JSON API sees the XML API's object
    with gcs_server.filesystem().open_input_stream(f"{bucket}/{key}") as f:
        assert f.read() == b"0123456789"

    status, headers, body = gcs_server.exchange("GET", _xml_path(bucket, key))
    assert (status, body, headers["x-goog-generation"], headers["content-length"]) == (
        200,
        b"0123456789",
        generation,
        "10",
    )
    assert email.utils.parsedate_to_datetime(headers["last-modified"]).year >= 2024
    status, headers, body = gcs_server.exchange("HEAD", _xml_path(bucket, key))
    assert (status, body, headers["content-length"], headers["x-goog-generation"]) == (
        200,
        b"",
        "10",
        generation,
    )
    for value, expected, content_range in [
        ("bytes=2-4", b"234", "bytes 2-4/10"),
        ("bytes=7-", b"789", "bytes 7-9/10"),
        ("bytes=-3", b"789", "bytes 7-9/10"),
        ("bytes=8-99", b"89", "bytes 8-9/10"),
    ]:
        status, headers, body = gcs_server.exchange("GET", _xml_path(bucket, key), headers={"Range": value})
        assert (status, body, headers["content-range"]) == (206, expected, content_range), value
    assert gcs_server.exchange("GET", _xml_path(bucket, key), headers={"Range": "bytes=10-"})[0] == 416

    # An update conditioned on the generation: the current one passes, a stale one is refused.
    update = {"x-goog-if-generation-match": generation}
    status, headers, _ = gcs_server.exchange("PUT", _xml_path(bucket, key), body=b"v2", headers=update)
    assert status == 200 and headers["x-goog-generation"] != generation
    assert gcs_server.exchange("PUT", _xml_path(bucket, key), body=b"v3", headers=update)[0] == 412
    assert gcs_server.exchange("GET", _xml_path(bucket, key))[2] == b"v2"

    # Copies (object_store's copy_if_not_exists, with the destination precondition), then deletes.
    odd = "odd name+#?%&=ü.json"
    gcs_server.put_object(bucket, odd, b"json api")  # written through the JSON API
    source = {"x-goog-copy-source": f"{quote(bucket, safe='')}/{quote(odd, safe='')}"}
    assert gcs_server.exchange("PUT", _xml_path(bucket, "copy"), headers=source)[0] == 200
    assert gcs_server.exchange("GET", _xml_path(bucket, "copy"))[2] == b"json api"
    refused = {**source, "x-goog-if-generation-match": "0"}
    assert gcs_server.exchange("PUT", _xml_path(bucket, key), headers=refused)[0] == 412
    assert gcs_server.exchange("PUT", _xml_path(bucket, "copy2"), headers=refused)[0] == 200
    assert gcs_server.exchange("DELETE", _xml_path(bucket, "copy"))[0] == 204
    assert gcs_server.exchange("DELETE", _xml_path(bucket, "copy"))[0] == 404
    assert gcs_server.exchange("GET", _xml_path(bucket, "copy"))[0] == 404
    assert gcs_server.list_keys(bucket) == ["copy2", odd, key]
    assert gcs_server.exchange("GET", _xml_path(f"{bucket}-missing", key))[0] == 404

    # What object_store does not use is refused at once (400), never approximated.
    assert gcs_server.exchange("POST", _xml_path(bucket, key), query={"uploads": ""})[0] == 400
    assert gcs_server.exchange("DELETE", _xml_path(bucket, key), headers=update)[0] == 400
    status, _, body = gcs_server.exchange(
        "GET", _xml_path(bucket, key), headers={"x-goog-if-metageneration-match": "1"}
    )
    assert status == 400 and b"not served by the test XML API" in body


def test_xml_api_listing(gcs_server: GcsServer) -> None:
    """``list-type=2`` with prefix, delimiter, start-after and continuation tokens, in GCS's XML."""
    bucket = gcs_server.create_bucket()
    for name in ("t/a/1", "t/a/2", "t/b", "t/c/3", "t/d", "u/x"):
        gcs_server.put_object(bucket, name, name)
    ns = {"s3": "http://doc.s3.amazonaws.com/2006-03-01"}

    def page(**query: str) -> tuple[list[str], list[str], str | None]:
        status, _, body = gcs_server.exchange("GET", _xml_path(bucket), query={"list-type": "2", **query})
        assert status == 200
        root = ET.fromstring(body)
        keys = [e.text or "" for e in root.findall("s3:Contents/s3:Key", ns)]
        sizes = [int(e.text or -1) for e in root.findall("s3:Contents/s3:Size", ns)]
        assert sizes == [len(k) for k in keys]  # each object's body is its name
        prefixes = [e.text or "" for e in root.findall("s3:CommonPrefixes/s3:Prefix", ns)]
        token = root.find("s3:NextContinuationToken", ns)
        assert (root.findtext("s3:IsTruncated", namespaces=ns) == "true") == (token is not None)
        return keys, prefixes, None if token is None else token.text

    assert page(prefix="t/") == (["t/a/1", "t/a/2", "t/b", "t/c/3", "t/d"], [], None)
    assert page(prefix="t/", delimiter="/") == (["t/b", "t/d"], ["t/a/", "t/c/"], None)
    assert page(prefix="t/", **{"start-after": "t/b"}) == (["t/c/3", "t/d"], [], None)
    # Pages of two entries, a common prefix counting as one.
    keys, prefixes, token = page(prefix="t/", delimiter="/", **{"max-keys": "2"})
    assert (keys, prefixes) == (["t/b"], ["t/a/"]) and token
    keys, prefixes, token = page(prefix="t/", delimiter="/", **{"max-keys": "2", "continuation-token": token})
    assert (keys, prefixes) == (["t/d"], ["t/c/"]) and token is None
    keys, _, token = page(**{"max-keys": "5"})
    assert keys == ["t/a/1", "t/a/2", "t/b", "t/c/3", "t/d"] and token
    assert page(**{"continuation-token": token}) == (["u/x"], [], None)
    assert (
        gcs_server.exchange("GET", _xml_path(bucket), query={"list-type": "2", "fetch-owner": "true"})[0]
        == 400
    )


def test_json_uploads_honour_if_generation_match(gcs_server: GcsServer) -> None:
    """``ifGenerationMatch`` on JSON-API uploads (real GCS honours it; the emulator did not)."""
    bucket = gcs_server.create_bucket()
    upload = f"/upload/storage/v1/b/{bucket}/o"
    gcs_server.put_object(bucket, "x", b"first")
    generation = json.loads(gcs_server.request("GET", f"/storage/v1/b/{bucket}/o/x")[1])["generation"]
    media = {"uploadType": "media", "name": "x"}
    assert gcs_server.request("POST", upload, query={**media, "ifGenerationMatch": "0"}, body=b"no")[0] == 412
    assert gcs_server.request("POST", upload, query={**media, "ifGenerationMatch": "1"}, body=b"no")[0] == 412
    status, body = gcs_server.request(
        "POST", upload, query={**media, "ifGenerationMatch": generation}, body=b"yes"
    )
    assert status == 200 and json.loads(body)["generation"] != generation
    assert (
        gcs_server.request(
            "POST", upload, query={**media, "ifGenerationMatch": "0", "name": "y"}, body=b"new"
        )[0]
        == 200
    )
    # A resumable upload's precondition is given when it starts and checked when it completes.
    status, headers, _ = gcs_server.exchange(
        "POST", upload, query={"uploadType": "resumable", "name": "z", "ifGenerationMatch": "0"}
    )
    assert status == 200
    gcs_server.put_object(bucket, "z", b"a concurrent writer")
    session = urlsplit(headers["location"])
    status, _ = gcs_server.request(
        "PUT", f"{session.path}?{session.query}", body=b"late", headers={"Content-Range": "bytes 0-3/4"}
    )
    assert status == 412
    with gcs_server.filesystem().open_input_stream(f"{bucket}/z") as f:
        assert f.read() == b"a concurrent writer"
    # pyarrow creates directory markers with ifGenerationMatch=0 and expects 412 for an existing one.
    fs = gcs_server.filesystem()
    fs.create_dir(f"{bucket}/dir")
    fs.create_dir(f"{bucket}/dir")
    assert fs.get_file_info(f"{bucket}/dir").type == Directory
    assert gcs_server.list_keys(bucket) == ["dir/", "x", "y", "z"]


def test_gcs_env_is_scoped_and_forwarded_to_workers(
    gcs_server: GcsServer, request: pytest.FixtureRequest
) -> None:
    assert "STORAGE_EMULATOR_HOST" in FORWARDED_ENV  # the job hands it to its Ray workers
    # gcs_server alone does not set it.
    assert os.environ.get("STORAGE_EMULATOR_HOST") != gcs_server.endpoint_url
    env = request.getfixturevalue("gcs_env")
    assert os.environ["STORAGE_EMULATOR_HOST"] == env.endpoint_url == gcs_server.endpoint_url


# ------------------------------------------------------------------------------------------
# pipeline.storage
# ------------------------------------------------------------------------------------------


def test_resolve_filesystem(gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = gcs_env.create_bucket()
    fs, path = resolve_filesystem(f"gs://{bucket}/some/prefix/")
    assert fs.type_name == "gcs"
    assert path == f"{bucket}/some/prefix"
    options = _options(fs)
    assert (options["anonymous"], options["scheme"], options["endpoint_override"]) == (
        True,
        "http",
        gcs_env.host_port,
    )
    assert resolve_filesystem(f"gcs://{bucket}/x") == (fs, f"{bucket}/x")  # alias, same cached filesystem
    # Without a scheme, STORAGE_EMULATOR_HOST means http.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_env.host_port)
    assert resolve_filesystem(f"gs://{bucket}")[0] is fs

    gcs_env.put_object(bucket, "some/prefix/a.jpg", b"abc")
    info = fs.get_file_info(f"{bucket}/some/prefix/a.jpg")
    assert (info.type, info.size) == (File, 3)
    assert fs.get_file_info(f"{bucket}/some/prefix").type == Directory  # implied by the object
    assert fs.get_file_info(f"{bucket}/some/pre").type == pafs.FileType.NotFound


@pytest.fixture()
def photos(gcs_env: GcsServer) -> str:
    """A bucket with images, hidden files, a non-image and look-alike sibling prefixes."""
    bucket = gcs_env.create_bucket()
    for key in (
        "photos/a.jpg",
        "photos/B.JPG",
        "photos/with space+plus#hash.jpg",
        "photos/ünïcode.jpeg",
        "photos/sub/c.png",
        "photos/sub/f.gif",
        "photos/sub/deeper/d.webp",
        "photos/.hidden.jpg",
        "photos/.cache/e.jpg",
        "photos/notes.txt",
        "photos2/sibling.jpg",
        "photosx.jpg",
    ):
        gcs_env.put_object(bucket, key, f"bytes of {key}")
    return bucket


def test_list_inputs_prefix(photos: str) -> None:
    expected = _items(
        photos,
        "photos",
        "B.JPG",
        "a.jpg",
        "sub/c.png",
        "sub/deeper/d.webp",
        "sub/f.gif",
        "with space+plus#hash.jpg",
        "ünïcode.jpeg",
    )
    assert list_inputs(f"gs://{photos}/photos") == expected
    assert list_inputs(f"gs://{photos}/photos/") == expected
    assert list_inputs(f"gs://{photos}/photos", limit=2) == expected[:2]
    assert list_inputs(f"gs://{photos}/photos/sub/c.png") == _items(photos, "photos/sub", "c.png")
    with pytest.raises(ConfigError, match="nothing exists"):
        list_inputs(f"gs://{photos}/nothing-here")
    with pytest.raises(ConfigError, match="neither a manifest"):
        list_inputs(f"gs://{photos}/photos/notes.txt")


def test_list_inputs_glob(photos: str) -> None:
    assert list_inputs(f"gs://{photos}/photos/*.jpg") == _items(
        photos, "photos", "a.jpg", "with space+plus#hash.jpg"
    )
    assert list_inputs(f"gs://{photos}/photos/**/*.png") == _items(photos, "photos", "sub/c.png")
    assert list_inputs(f"gs://{photos}/photos/sub/**") == _items(
        photos, "photos/sub", "c.png", "deeper/d.webp", "f.gif"
    )
    assert list_inputs(f"gs://{photos}/photo*/*.jpg") == [
        InputItem(image_id=rel, uri=f"gs://{photos}/{rel}")
        for rel in ("photos/a.jpg", "photos/with space+plus#hash.jpg", "photos2/sibling.jpg")
    ]
    with pytest.raises(ConfigError, match="No files match"):
        list_inputs(f"gs://{photos}/photos/*.bmp")
    with pytest.raises(ConfigError, match="bucket name"):
        list_inputs(f"gs://{photos[:-2]}*/photos/a.jpg")


def test_list_inputs_manifests(gcs_env: GcsServer, photos: str) -> None:
    table = pa.table(
        {
            "uri": ["../photos/a.jpg", f"gs://{photos}/photos/sub/c.png", "local/missing.jpg"],
            "image_id": ["first", "second", "third"],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    gcs_env.put_object(photos, "manifests/list.parquet", sink.getvalue())
    items = list_inputs(f"gs://{photos}/manifests/list.parquet")
    assert items == [
        InputItem("first", f"gs://{photos}/photos/a.jpg"),
        InputItem("second", f"gs://{photos}/photos/sub/c.png"),
        InputItem("third", f"gs://{photos}/manifests/local/missing.jpg"),
    ]
    got = read_bytes([item.uri for item in items])
    assert got[:2] == [b"bytes of photos/a.jpg", b"bytes of photos/sub/c.png"]
    assert isinstance(got[2], InputReadError)

    csv = io.BytesIO()
    pacsv.write_csv(pa.table({"uri": ["../photos/B.JPG", "sub dir/x.png"]}), csv)
    gcs_env.put_object(photos, "manifests/list.csv", csv.getvalue())
    assert list_inputs(f"gs://{photos}/manifests/list.csv") == [
        InputItem("../photos/B.JPG", f"gs://{photos}/photos/B.JPG"),
        InputItem("sub dir/x.png", f"gs://{photos}/manifests/sub dir/x.png"),
    ]
    gcs_env.put_object(photos, "manifests/no-uri.csv", "path\na.jpg\n")
    with pytest.raises(ConfigError, match="no 'uri' column"):
        list_inputs(f"gs://{photos}/manifests/no-uri.csv")


def test_read_bytes(gcs_env: GcsServer) -> None:
    bucket = gcs_env.create_bucket()
    names = ["a.jpg", "empty.jpg", "with space+plus#hash?.jpg", "ünïcode.jpg"]
    bodies = [b"\xff\xd8jpeg", b"", b"odd name", "ünï".encode()]
    for name, body in zip(names, bodies, strict=True):
        gcs_env.put_object(bucket, f"r/{name}", body)
    missing = f"gs://{bucket}/r/missing.jpg"
    no_bucket = f"gs://{bucket}-does-not-exist/r/a.jpg"
    uris = [f"gs://{bucket}/r/{name}" for name in names] + [missing, no_bucket, "ftp://host/x.jpg"]
    got = read_bytes(uris, threads=4)
    assert got[:4] == bodies
    for uri, result in zip(uris[4:], got[4:], strict=True):
        assert isinstance(result, InputReadError), uri
        assert result.code == ErrorCode.READ_FAILED
        assert uri in result.message
    assert "FileNotFoundError" in got[4].message  # type: ignore[union-attr]

    too_large = read_bytes([uris[0]], max_bytes=3)[0]
    assert isinstance(too_large, InputReadError)
    assert too_large.code == ErrorCode.TOO_LARGE
    assert read_bytes([uris[0]], max_bytes=6) == [bodies[0]]
    (gone,) = read_bytes([missing])
    assert isinstance(gone, InputReadError) and "missing.jpg" in gone.message

    # Many concurrent readers, in order.
    many = [gcs_env.put_object(bucket, f"many/{i:02d}.png", f"image {i}") for i in range(24)]
    assert read_bytes(many, threads=8) == [f"image {i}".encode() for i in range(24)]


def test_output_is_empty(gcs_env: GcsServer) -> None:
    bucket = gcs_env.create_bucket()
    fs = gcs_env.filesystem()
    assert output_is_empty(f"gs://{bucket}/out")  # nothing there
    gcs_env.put_object(bucket, "out2/x.parquet", b"x")  # a sibling prefix does not count
    gcs_env.put_object(bucket, "outx", b"x")
    assert output_is_empty(f"gs://{bucket}/out")
    fs.create_dir(f"{bucket}/out")  # an empty "folder" (a directory marker)
    assert output_is_empty(f"gs://{bucket}/out")
    assert output_is_empty(f"gs://{bucket}/out/")
    fs.create_dir(f"{bucket}/out/sub")  # a folder holding an empty folder is not empty
    assert not output_is_empty(f"gs://{bucket}/out")
    gcs_env.put_object(bucket, "files/_SUCCESS", b"{}")
    assert not output_is_empty(f"gs://{bucket}/files")
    assert not output_is_empty(f"gs://{bucket}/outx")  # an object at the location itself


def test_output_with_objects_only_in_subfolders_is_not_empty(gcs_env: GcsServer) -> None:
    bucket = gcs_env.create_bucket()
    gcs_env.put_object(bucket, "out/previous-run/part-000000.parquet", b"x")
    assert not output_is_empty(f"gs://{bucket}/out")


def test_ensure_output_dir_creates_nothing(gcs_env: GcsServer) -> None:
    bucket = gcs_env.create_bucket()
    ensure_output_dir(f"gs://{bucket}/new/out")
    ensure_output_dir(f"gs://{bucket}-not-created-either/out")
    assert gcs_env.list_keys(bucket) == []
    assert gcs_env.request("GET", f"/storage/v1/b/{bucket}-not-created-either")[0] == 404
    with pytest.raises(ConfigError, match="names no bucket"):
        ensure_output_dir("gs://")


# ------------------------------------------------------------------------------------------
# pipeline.table: data files on gs:// (pyarrow), the table's log on gs:// (delta-rs)
# ------------------------------------------------------------------------------------------

TOKENS, DIM = 5, 8


def _spec() -> TableSpec:
    return TableSpec(tensors=(("features", TensorSpec("float16", (TOKENS, DIM))),), pooled_dim=DIM)


def _rows(prefix: str = "img") -> tuple[InputRows, np.ndarray, np.ndarray]:
    """Five inputs, rows 1 and 2 failed: features (3, 5, 8) float16 and pooled (3, 8)."""
    rows = InputRows()
    for i in range(5):
        image_id = f"{prefix}-{i}"
        uri = f"gs://in/{image_id}.jpg"
        if i in (1, 2):
            rows.add_error(image_id, uri, code=ErrorCode.CORRUPT.value, message=f"{image_id}: broken")
        else:
            rows.add_ok(image_id, uri, width=100 + i, height=50 + i)
    feats = np.random.default_rng(len(prefix)).standard_normal((3, TOKENS, DIM)).astype(np.float16)
    return rows, feats, feats.astype(np.float32).mean(axis=1)


def _batch(prefix: str = "img") -> tuple[pa.Table, np.ndarray, np.ndarray]:
    rows, feats, pooled = _rows(prefix)
    return build_batch(rows, _spec(), features={"features": feats}, pooled=pooled), feats, pooled


def _name(unit: int) -> str:
    return DataFileName(1, unit, 0, f"{unit:02x}" * 10, "0123abcd").name()


def test_write_data_file_and_read_it_back(gcs_env: GcsServer) -> None:
    bucket = gcs_env.create_bucket()
    fs, out = resolve_filesystem(f"gs://{bucket}/out")
    table, feats, pooled = _batch()
    written = write_data_file(table, filesystem=fs, folder=out, name=_name(4))
    assert (written.path, written.rows, written.ok) == (_name(4), 5, 3)
    assert written.text_bounds["image_id"] == ("img-0", "img-4")
    assert gcs_env.list_keys(bucket) == [f"out/{_name(4)}"]  # straight to the final key, no temporary one
    assert written.size == fs.get_file_info(f"{out}/{_name(4)}").size
    assert not output_is_empty(f"gs://{bucket}/out")

    # One data file is read as it is (no table log needed), by URI.
    got = read_features(f"gs://{bucket}/out/{_name(4)}")
    np.testing.assert_array_equal(got.features, feats)
    assert got.image_ids == ["img-0", "img-3", "img-4"] and got.identity is None
    np.testing.assert_allclose(np.stack(got.table.column("pooled").to_pylist()), pooled, rtol=1e-6)
    everything = read_features(f"gs://{bucket}/out/{_name(4)}", status=None, column=None)
    assert everything.table.column("status").to_pylist() == ["ok", "error", "error", "ok", "ok"]
    assert everything.table.column("error_code").to_pylist()[1] == "corrupt"
    # Any Parquet reader: plain binary tensors, their dtype and shape in the field metadata.
    with fs.open_input_file(f"{out}/{_name(4)}") as f:
        plain = pq.read_table(f)
    assert plain.schema.field("features").type == pa.binary() and plain.num_rows == 5

    # Written again (a retried task): replaced under the same key, not duplicated.
    again, _, _ = _batch("again")
    write_data_file(again, filesystem=fs, folder=out, name=_name(4))
    assert gcs_env.list_keys(bucket) == [f"out/{_name(4)}"]
    assert read_features(f"gs://{bucket}/out/{_name(4)}").image_ids == ["again-0", "again-3", "again-4"]


def test_failed_write_leaves_no_object(gcs_env: GcsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = gcs_env.create_bucket()
    fs, out = resolve_filesystem(f"gs://{bucket}/out")
    table, _, _ = _batch()
    real = pq.ParquetWriter.write_table

    def half(self: pq.ParquetWriter, table: pa.Table, row_group_size: int | None = None) -> None:
        real(self, table.slice(0, 2), row_group_size=1)
        raise OSError("connection reset")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", half)
    with pytest.raises(OSError, match="connection reset"):
        write_data_file(table, filesystem=fs, folder=out, name=_name(0))
    assert gcs_env.list_keys(bucket) == []  # closing the upload committed a partial object: deleted again


def test_table_location_on_gs(gcs_env: GcsServer) -> None:
    """Both views of a gs:// table reach the emulator: pyarrow's (data files) and delta-rs's (the log).
    Checked before any request is sent, so that the failing case never contacts Google."""
    bucket = gcs_env.create_bucket()
    location = TableLocation(f"gs://{bucket}/out/")
    fs, path = resolve_filesystem(f"gs://{bucket}/out")
    assert location.filesystem is fs and location.path == path == f"{bucket}/out"
    assert _options(location.filesystem)["endpoint_override"] == gcs_env.host_port
    assert location.join(_name(0)) == f"{bucket}/out/{_name(0)}"
    assert location.delta_uri == f"gs://{bucket}/out"
    options = location.storage_options()
    assert options["google_base_url"] == gcs_env.endpoint_url and options["allow_http"] == "true"
    assert json.loads(options["google_service_account_key"])["disable_oauth"] is True  # no token sent


def _identity() -> TableIdentity:
    return TableIdentity(
        job="job-gcs",
        created="2026-12-07T00:00:00+00:00",
        fingerprint="fp-gcs",
        spec=_spec(),
        options={"encoder.pooled": True},
        encoder={"output_dtype": "float16"},
        config={"model": {"checkpoint": "/models/tiny"}},
    )


def test_table_on_gs_claim_commit_read(gcs_env: GcsServer) -> None:
    """A table whose log is on gs://: the claim, a unit's commit, the finish; the second claim loses."""
    bucket = gcs_env.create_bucket()
    location = TableLocation(f"gs://{bucket}/out")
    run = TableWriter.open(location, identity=_identity(), mode="create").start(
        RunPlan(plan="p", units=1, rows=5)
    )
    unit = PlannedUnit(0, "ab" * 10, 5)
    table, feats, _ = _batch()
    written = run.target().write(table, unit=0, piece=0, key=unit.key)
    committer = run.committer({0: unit}, interval_s=0.01)
    committer.add(unit=0, piece=0, last=True, file=written, rows=5, ok=3, errors={"corrupt": 2})
    committer.close()
    outcome = run.finish([unit], max_error_fraction=0.5)
    run.close()
    assert (outcome.state, outcome.rows, outcome.ok) == ("complete", 5, 3)
    got = read_features(f"gs://{bucket}/out")
    np.testing.assert_array_equal(got.features, feats)
    assert got.state == "complete" and got.identity.fingerprint == "fp-gcs"
    keys = gcs_env.list_keys(bucket, "out/")
    assert "out/_SUCCESS" in keys and "out/_delta_log/00000000000000000000.json" in keys
    with pytest.raises(OutputError, match="feature table of job job-gcs"):
        TableWriter.open(location, identity=_identity(), mode="create")


# ------------------------------------------------------------------------------------------
# The job: tar shards and Parquet images on gs://, through a local Ray
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local(gcs_server: GcsServer) -> Iterator[None]:
    """One local Ray (free ports: the tests pass beside another Ray) for the module's jobs. Started
    before a test's ``gcs_env``: its workers reach the emulator because the job forwards
    ``STORAGE_EMULATOR_HOST`` to them (``FORWARDED_ENV``), not because they inherited it."""
    with local_ray(num_cpus=3, include_dashboard=False, logging_level="WARNING"):
        yield


def _job_config(model: Any, **input_section: Any) -> Any:
    from pipeline.config import load_config

    return load_config(
        None,
        {
            "model": {"checkpoint": str(model), "dtype": "float32"},
            "input": {"keep_columns": ["caption"], **input_section},
            "job": {"shard_size": 2, "max_error_fraction": 0.0},
        },
    )


def _put_inputs(gcs_env: GcsServer, bucket: str, tmp_path: Path) -> dict[str, dict[str, str]]:
    """Two tars of three samples (``wds/``) and a Parquet file of four images (``hf/``); the tars' samples."""
    from tests.datasets import photo_bytes, write_image_parquet, write_shards

    expected = write_shards(tmp_path / "shards", shards=2, per_shard=3)
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        gcs_env.put_object(bucket, f"wds/{tar.name}", tar.read_bytes())
    write_image_parquet(
        tmp_path / "hf.parquet", photo_bytes(4), columns={"caption": list("abcd")}, row_group_size=2
    )
    gcs_env.put_object(bucket, "hf/train-0.parquet", (tmp_path / "hf.parquet").read_bytes())
    return expected


@pytest.mark.slow
def test_job_reads_webdataset_and_parquet_images_from_gcs(
    ray_local: None, gcs_env: GcsServer, tiny_llava, tmp_path
) -> None:
    from pipeline.offline import run_job

    bucket = gcs_env.create_bucket()
    expected = _put_inputs(gcs_env, bucket, tmp_path)
    wds = run_job(_job_config(tiny_llava), f"gs://{bucket}/wds/*.tar", str(tmp_path / "wds"))
    hf = run_job(_job_config(tiny_llava, image_column="image"), f"gs://{bucket}/hf", str(tmp_path / "hf"))
    # tars of 3 samples in files of 2: two files a unit
    assert (wds.input_kind, wds.ok, wds.units_total, wds.files_total, wds.state) == (
        "webdataset",
        6,
        2,
        4,
        "complete",
    )
    assert (hf.input_kind, hf.ok, hf.units_total, hf.state) == ("parquet", 4, 2, "complete")
    got = read_features(tmp_path / "wds").table
    assert got.column("image_id").to_pylist() == sorted(expected)  # every sample exactly once, in order
    assert got.column("caption").to_pylist() == [expected[k]["caption"] for k in sorted(expected)]
    got = read_features(tmp_path / "hf").table
    assert got.column("image_id").to_pylist() == [f"train-0.parquet#{i}" for i in range(4)]
    assert got.column("uri").to_pylist()[3] == f"gs://{bucket}/hf/train-0.parquet#3"
    assert got.column("caption").to_pylist() == list("abcd")
    assert (tmp_path / "wds" / SUCCESS_FILE).exists() and (tmp_path / "hf" / SUCCESS_FILE).exists()


@pytest.mark.slow
def test_job_writes_its_table_to_gcs(ray_local: None, gcs_env: GcsServer, tiny_llava, tmp_path) -> None:
    from pipeline.offline import run_job
    from pipeline.table import inspect_table

    bucket = gcs_env.create_bucket()
    expected = _put_inputs(gcs_env, bucket, tmp_path)
    wds = run_job(_job_config(tiny_llava), f"gs://{bucket}/wds/*.tar", f"gs://{bucket}/out/wds")
    assert (wds.ok, wds.units_total, wds.files_total, wds.state) == (6, 2, 4, "complete")
    got = read_features(f"gs://{bucket}/out/wds").table
    assert got.column("image_id").to_pylist() == sorted(expected)
    report = inspect_table(f"gs://{bucket}/out/wds")
    assert (report.state, report.rows, report.units_committed, report.orphan_files) == ("complete", 6, 2, [])
    keys = gcs_env.list_keys(bucket, "out/")
    assert "out/wds/_SUCCESS" in keys and "out/wds/_delta_log/00000000000000000000.json" in keys


def test_plan_and_expand_webdataset_and_parquet_on_gcs(gcs_env: GcsServer, tmp_path) -> None:
    from pipeline.storage import InputOptions, ReadOptions, expand_unit, plan_inputs
    from tests.datasets import photo_bytes, write_image_parquet, write_shards

    bucket = gcs_env.create_bucket()
    expected = write_shards(tmp_path / "shards", shards=3, per_shard=2)
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        gcs_env.put_object(bucket, f"shards/{tar.name}", tar.read_bytes())
    plan = plan_inputs(f"gs://{bucket}/shards/{{00000..00002}}.tar")
    assert (
        plan.kind == "webdataset"
        and len(plan.units) == 3
        and plan.units[0].stamp.startswith(str((tmp_path / "shards" / "00000.tar").stat().st_size))
    )
    samples = [
        s
        for u in plan.units
        for chunk in expand_unit(u, 10, ReadOptions(keep_columns=("url",)))
        for s in chunk
    ]
    assert [s.image_id for s in samples] == sorted(expected)
    assert [s.carried["url"] for s in samples] == [expected[k]["url"] for k in sorted(expected)]
    images = photo_bytes(3)
    write_image_parquet(tmp_path / "x.parquet", images, struct=False)
    gcs_env.put_object(bucket, "pq/x.parquet", (tmp_path / "x.parquet").read_bytes())
    plan = plan_inputs(f"gs://{bucket}/pq/x.parquet", options=InputOptions(image_column="image"))
    (chunk,) = expand_unit(plan.units[0], 10, ReadOptions(image_column="image"))
    assert [s.data for s in chunk] == images
