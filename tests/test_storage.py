"""pipeline.storage: listing, manifests, reading bytes, shard plans, output helpers (local, S3, GCS)."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.model.errors import ConfigError, ErrorCode, InputReadError
from pipeline.storage import (
    IMAGE_EXTENSIONS,
    InputItem,
    Shard,
    ensure_output_dir,
    join_path,
    list_inputs,
    output_is_empty,
    plan_fingerprint,
    plan_shards,
    read_bytes,
    resolve_filesystem,
)

_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "STORAGE_EMULATOR_HOST")


@pytest.fixture(autouse=True)
def _clean_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _AWS_ENV:
        monkeypatch.delenv(name, raising=False)


def _write(root: Path, rel: str, data: bytes | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else rel.encode())
    return path


@pytest.fixture()
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for rel in [
        "cats/0002.jpg",
        "cats/0001.JPG",
        "dogs/a.png",
        "dogs/deep/b.webp",
        "top.jpeg",
        "x.tiff",
        "notes.txt",
        "cats/readme.md",
        ".hidden/c.jpg",
        "dogs/.d.png",
    ]:
        _write(root, rel)
    return root


# ------------------------------------------------------------------------------------------
# URIs and filesystems
# ------------------------------------------------------------------------------------------


def test_resolve_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = resolve_filesystem("rel/dir")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "rel" / "dir")
    assert resolve_filesystem(f"file://{tmp_path}/x y")[1] == str(tmp_path / "x y")
    assert resolve_filesystem("file:///tmp/a%20b")[1] == "/tmp/a b"
    assert resolve_filesystem(str(tmp_path) + "/")[1] == str(tmp_path)


def test_resolve_s3_endpoint_and_region(monkeypatch: pytest.MonkeyPatch) -> None:
    fs, path = resolve_filesystem("s3://bucket/some/prefix/", s3_endpoint="http://127.0.0.1:9")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/some/prefix"
    assert fs.region == "us-east-1"
    # The explicit endpoint wins over the environment; AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT_URL.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://127.0.0.1:2")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert storage._effective_s3_endpoint(None) == "https://127.0.0.1:2"
    assert storage._effective_s3_endpoint("http://h:3") == "http://h:3"
    assert resolve_filesystem("s3://bucket/p")[0].region == "eu-west-3"


@pytest.mark.parametrize("bad", ["ftp://host/x", "hdfs://nn/path", "http://example.com/a.jpg"])
def test_unknown_scheme(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"s3://.*gs://"):
        resolve_filesystem(bad)


def test_bad_s3_uri_and_endpoint() -> None:
    with pytest.raises(ConfigError, match="bucket"):
        resolve_filesystem("s3:///key")
    with pytest.raises(ConfigError, match="endpoint"):
        resolve_filesystem("s3://b/k", s3_endpoint="ftp://host:1")


def test_gcs_construction_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    for uri in ("gs://my-bucket/a/b/", "gcs://my-bucket/a/b"):
        fs, path = resolve_filesystem(uri)
        assert isinstance(fs, pafs.GcsFileSystem)
        assert path == "my-bucket/a/b"
    anonymous = pafs.GcsFileSystem(anonymous=True)
    assert isinstance(pickle.loads(pickle.dumps(anonymous)), pafs.GcsFileSystem)
    assert storage.split_uri("gs://b/img.JPG") == ("gs", "b/img.JPG")


def test_filesystems_are_rebuilt_from_uris_in_a_worker_process(tmp_path: Path) -> None:
    """Workers get URIs (plus the s3_endpoint setting) and build their filesystems themselves."""
    fs, path = pickle.loads(pickle.dumps(resolve_filesystem(str(tmp_path))))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    fs, path = resolve_filesystem("s3://b/p", s3_endpoint="http://127.0.0.1:9")
    assert isinstance(pickle.loads(pickle.dumps(fs)), pafs.S3FileSystem) and path == "b/p"


def test_join_path() -> None:
    assert join_path("b/p", "x.parquet") == "b/p/x.parquet"
    assert join_path("b/p/", "/x.parquet") == "b/p/x.parquet"
    assert join_path("b", "d/x") == "b/d/x"
    assert join_path("/out", "x") == "/out/x"
    assert join_path("/", "x") == "/x"
    assert join_path("", "x") == "x"


# ------------------------------------------------------------------------------------------
# Local listings
# ------------------------------------------------------------------------------------------


def test_list_directory_recursive_sorted_filtered(image_tree: Path) -> None:
    items = list_inputs(str(image_tree))
    assert [i.image_id for i in items] == [
        "cats/0001.JPG",
        "cats/0002.jpg",
        "dogs/a.png",
        "dogs/deep/b.webp",
        "top.jpeg",
        "x.tiff",
    ]
    assert [i.uri for i in items] == sorted(i.uri for i in items)
    assert all(os.path.isabs(i.uri) and Path(i.uri).is_file() for i in items)
    assert list_inputs(f"file://{image_tree}/") == items
    assert list_inputs(str(image_tree), limit=2) == items[:2]
    assert list_inputs(str(image_tree), limit=100) == items


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} == IMAGE_EXTENSIONS
    assert storage.is_image_path("a/B.TIF")
    assert not storage.is_image_path("a/b.txt")


def test_list_relative_dir(image_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image_tree.parent)
    assert [i.image_id for i in list_inputs("images/dogs")] == ["a.png", "deep/b.webp"]


def test_list_glob(image_tree: Path) -> None:
    ids = [i.image_id for i in list_inputs(f"{image_tree}/*/*.jpg")]
    assert ids == ["cats/0002.jpg"]  # case-sensitive, one folder level, exactly as the glob says
    ids = [i.image_id for i in list_inputs(f"{image_tree}/**/*.[jJ][pP]*")]
    assert ids == ["cats/0001.JPG", "cats/0002.jpg", "top.jpeg"]  # ** also matches zero folders
    ids = [i.image_id for i in list_inputs(f"{image_tree}/dogs/**")]
    assert ids == ["a.png", "deep/b.webp"]  # image_id: relative to the folder before the first wildcard
    # Wildcards skip names starting with "." unless the glob spells the dot (as in a shell).
    assert [i.image_id for i in list_inputs(f"{image_tree}/.hidden/*.jpg")] == ["c.jpg"]
    assert [i.image_id for i in list_inputs(f"{image_tree}/dogs/.*")] == [".d.png"]
    ids = [i.image_id for i in list_inputs(f"{image_tree}/cats/*")]  # no extension filter on globs
    assert ids == ["0001.JPG", "0002.jpg", "readme.md"]
    ids = [i.image_id for i in list_inputs(f"{image_tree}/*.t?ff")]
    assert ids == ["x.tiff"]
    with pytest.raises(ConfigError, match="No files match"):
        list_inputs(f"{image_tree}/*.gif")


def test_list_single_file(image_tree: Path) -> None:
    items = list_inputs(str(image_tree / "dogs" / "a.png"))
    assert items == [InputItem("a.png", str(image_tree / "dogs" / "a.png"))]
    with pytest.raises(ConfigError, match="neither a manifest"):
        list_inputs(str(image_tree / "notes.txt"))


def test_list_errors(tmp_path: Path, image_tree: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        list_inputs(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    _write(empty, "a.txt")
    with pytest.raises(ConfigError, match=r"No images found under .*\.jpeg"):
        list_inputs(str(empty))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="limit"):
            list_inputs(str(image_tree), limit=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Manifests
# ------------------------------------------------------------------------------------------


def _manifest(path: Path, columns: dict[str, list[object]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_with_image_id(image_tree: Path, suffix: str) -> None:
    manifest = _manifest(
        image_tree / f"m{suffix}",
        {
            "image_id": ["0007", "b", "a"],
            "uri": ["dogs/a.png", str(image_tree / "top.jpeg"), "./cats/../x.tiff"],
        },
    )
    items = list_inputs(manifest)
    assert items == [  # manifest order, ids kept as text ("0007" stays "0007"), relative uris resolved
        InputItem("0007", str(image_tree / "dogs" / "a.png")),
        InputItem("b", str(image_tree / "top.jpeg")),
        InputItem("a", str(image_tree / "x.tiff")),
    ]
    assert list_inputs(manifest, limit=1) == items[:1]
    assert read_bytes([i.uri for i in items]) == [b"dogs/a.png", b"top.jpeg", b"x.tiff"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_without_image_id(image_tree: Path, suffix: str) -> None:
    manifest = _manifest(
        image_tree / "sub" / f"m{suffix}", {"uri": ["../dogs/a.png", "s3://b/k.jpg"], "x": [1, 2]}
    )
    items = list_inputs(manifest)
    assert items == [
        InputItem("../dogs/a.png", str(image_tree / "dogs" / "a.png")),
        InputItem("s3://b/k.jpg", "s3://b/k.jpg"),
    ]


def test_manifest_integer_image_id(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.parquet", {"image_id": [3, 1], "uri": ["a.jpg", "b.jpg"]})
    assert [i.image_id for i in list_inputs(manifest)] == ["3", "1"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_errors(tmp_path: Path, suffix: str) -> None:
    dup = _manifest(
        tmp_path / f"dup{suffix}", {"image_id": ["a", "b", "a"], "uri": ["1.jpg", "2.jpg", "3.jpg"]}
    )
    with pytest.raises(ConfigError, match=r"duplicate image_id.*'a'.*rows 1 and 3"):
        list_inputs(dup)
    dup_uri = _manifest(tmp_path / f"dupuri{suffix}", {"uri": ["1.jpg", "1.jpg"]})
    with pytest.raises(ConfigError, match=r"duplicate uri.*'1.jpg'"):
        list_inputs(dup_uri)
    missing = _manifest(tmp_path / f"nouri{suffix}", {"path": ["1.jpg"]})
    with pytest.raises(ConfigError, match="no 'uri' column"):
        list_inputs(missing)
    empty_uri = _manifest(tmp_path / f"emptyuri{suffix}", {"uri": ["1.jpg", None], "image_id": ["a", "b"]})
    with pytest.raises(ConfigError, match="row 2 has an empty uri"):
        list_inputs(empty_uri)
    bad_scheme = _manifest(tmp_path / f"scheme{suffix}", {"uri": ["ftp://h/1.jpg"]})
    with pytest.raises(ConfigError, match="Unsupported URI scheme"):
        list_inputs(bad_scheme)


def test_manifest_no_rows(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,image_id\n")
    with pytest.raises(ConfigError, match="no rows"):
        list_inputs(str(manifest))


# ------------------------------------------------------------------------------------------
# Reading bytes
# ------------------------------------------------------------------------------------------


def test_read_bytes_local(image_tree: Path) -> None:
    uris = [
        str(image_tree / "top.jpeg"),
        str(image_tree / "nope.jpg"),
        str(image_tree / "x.tiff"),
        "ftp://h/x",
    ]
    out = read_bytes(uris, threads=3)
    assert out[0] == b"top.jpeg"
    assert out[2] == b"x.tiff"
    for slot, uri in ((1, uris[1]), (3, uris[3])):
        err = out[slot]
        assert isinstance(err, InputReadError)
        assert err.code == ErrorCode.READ_FAILED
        assert uri in err.message
    assert read_bytes([]) == []
    assert read_bytes(uris[:1], threads=1) == [b"top.jpeg"]
    # A folder is not readable either.
    assert isinstance(read_bytes([str(image_tree)])[0], InputReadError)


def test_read_bytes_errors_and_max_bytes(image_tree: Path) -> None:
    assert read_bytes([str(image_tree / "top.jpeg")]) == [b"top.jpeg"]
    (missing,) = read_bytes([str(image_tree / "nope.jpg")])
    assert isinstance(missing, InputReadError) and "nope.jpg" in missing.message
    assert missing.code == ErrorCode.READ_FAILED
    assert read_bytes([str(image_tree / "top.jpeg")], max_bytes=8) == [b"top.jpeg"]
    (big,) = read_bytes([str(image_tree / "top.jpeg")], max_bytes=7)
    assert isinstance(big, InputReadError) and big.code == ErrorCode.TOO_LARGE
    with pytest.raises(ConfigError):
        read_bytes(["x"], threads=0)


def test_read_bytes_many_in_order(tmp_path: Path) -> None:
    paths = [str(_write(tmp_path, f"d/{i:03d}.png", str(i).encode())) for i in range(50)]
    assert read_bytes(paths, threads=8) == [str(i).encode() for i in range(50)]


# ------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------


def _items(n: int) -> list[InputItem]:
    return [InputItem(f"id{i}", f"/data/{i}.jpg") for i in range(n)]


@pytest.mark.parametrize(
    ("n", "size", "lengths"), [(10, 3, [3, 3, 3, 1]), (9, 3, [3, 3, 3]), (2, 5, [2]), (0, 4, [])]
)
def test_plan_shards(n: int, size: int, lengths: list[int]) -> None:
    items = _items(n)
    shards = plan_shards(items, size)
    assert [len(s.items) for s in shards] == lengths
    assert [s.index for s in shards] == list(range(len(lengths)))
    assert [item for s in shards for item in s.items] == items
    assert all(isinstance(s, Shard) and isinstance(s.items, tuple) for s in shards)
    assert plan_shards(items, size) == shards


def test_plan_shards_bad_size() -> None:
    for bad in (0, -3, True):
        with pytest.raises(ConfigError, match="shard_size"):
            plan_shards(_items(3), bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="shard_size"):
            plan_fingerprint(_items(3), bad)  # type: ignore[arg-type]


def test_plan_fingerprint() -> None:
    items = _items(10)
    fp = plan_fingerprint(items, 4)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert plan_fingerprint(list(items), 4) == fp  # stable
    assert plan_fingerprint(items, 5) != fp  # shard size
    assert plan_fingerprint(items[:-1], 4) != fp  # one item fewer
    assert plan_fingerprint(items[::-1], 4) != fp  # order
    renamed = [InputItem("other", items[0].uri), *items[1:]]
    assert plan_fingerprint(renamed, 4) != fp  # an id
    moved = [InputItem(items[0].image_id, "/elsewhere.jpg"), *items[1:]]
    assert plan_fingerprint(moved, 4) != fp  # a uri
    # No ambiguity from concatenation.
    assert plan_fingerprint([InputItem("a", "bc")], 1) != plan_fingerprint([InputItem("ab", "c")], 1)
    assert plan_fingerprint([], 4) == plan_fingerprint([], 4)


# ------------------------------------------------------------------------------------------
# Output helpers (local)
# ------------------------------------------------------------------------------------------


def test_output_helpers_local(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    assert output_is_empty(str(out))
    ensure_output_dir(str(out))
    assert out.is_dir()
    ensure_output_dir(str(out))  # idempotent
    assert output_is_empty(str(out))
    _write(out, "part-0.parquet")
    assert not output_is_empty(str(out))
    assert not output_is_empty(str(out / "part-0.parquet"))
    with pytest.raises(ConfigError, match="not a folder"):
        ensure_output_dir(str(out / "part-0.parquet"))
    ensure_output_dir("s3://bucket/prefix")  # no-op for object stores
    ensure_output_dir("gs://bucket/prefix")


# ------------------------------------------------------------------------------------------
# S3 (moto)
# ------------------------------------------------------------------------------------------

_S3_KEYS = ["imgs/b/2.png", "imgs/a/1.jpg", "imgs/a/3.JPEG", "imgs/a/skip.txt", "imgs2/other.jpg", "top.jpg"]


@pytest.fixture()
def s3_bucket(s3_server, request: pytest.FixtureRequest) -> str:  # type: ignore[no-untyped-def]
    bucket = "storage-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    s3_server.create_bucket(bucket)
    for key in _S3_KEYS:
        s3_server.put_object(bucket, key, key.encode())
    return bucket


def test_s3_list_explicit_endpoint(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    items = list_inputs(f"s3://{s3_bucket}/imgs", s3_endpoint=s3_server.endpoint_url)
    assert items == [
        InputItem("a/1.jpg", f"s3://{s3_bucket}/imgs/a/1.jpg"),
        InputItem("a/3.JPEG", f"s3://{s3_bucket}/imgs/a/3.JPEG"),
        InputItem("b/2.png", f"s3://{s3_bucket}/imgs/b/2.png"),
    ]
    assert list_inputs(f"s3://{s3_bucket}/imgs/", s3_endpoint=s3_server.endpoint_url, limit=1) == items[:1]
    whole = list_inputs(f"s3://{s3_bucket}", s3_endpoint=s3_server.endpoint_url)
    assert [i.image_id for i in whole] == [
        "imgs/a/1.jpg",
        "imgs/a/3.JPEG",
        "imgs/b/2.png",
        "imgs2/other.jpg",
        "top.jpg",
    ]
    single = list_inputs(f"s3://{s3_bucket}/top.jpg", s3_endpoint=s3_server.endpoint_url)
    assert single == [InputItem("top.jpg", f"s3://{s3_bucket}/top.jpg")]
    with pytest.raises(ConfigError, match="No images found"):
        list_inputs(f"s3://{s3_bucket}/nothing-here", s3_endpoint=s3_server.endpoint_url)


def test_s3_list_env_endpoint(s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    items = list_inputs(f"s3://{s3_bucket}/imgs")
    assert [i.image_id for i in items] == ["a/1.jpg", "a/3.JPEG", "b/2.png"]
    assert read_bytes([i.uri for i in items]) == [b"imgs/a/1.jpg", b"imgs/a/3.JPEG", b"imgs/b/2.png"]
    # An explicit endpoint wins over the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    assert list_inputs(f"s3://{s3_bucket}/imgs", s3_endpoint=s3_server.endpoint_url) == items


def test_s3_glob(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    endpoint = s3_server.endpoint_url
    assert [i.image_id for i in list_inputs(f"s3://{s3_bucket}/imgs/*/*.png", s3_endpoint=endpoint)] == [
        "b/2.png"
    ]
    ids = [i.image_id for i in list_inputs(f"s3://{s3_bucket}/**/*.jpg", s3_endpoint=endpoint)]
    assert ids == ["imgs/a/1.jpg", "imgs2/other.jpg", "top.jpg"]
    ids = [i.image_id for i in list_inputs(f"s3://{s3_bucket}/imgs*/*", s3_endpoint=endpoint)]
    assert ids == ["imgs2/other.jpg"]
    with pytest.raises(ConfigError, match="bucket name"):
        list_inputs("s3://storage-*/x.jpg", s3_endpoint=endpoint)


def test_s3_manifest(s3_server, s3_bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint = s3_server.endpoint_url
    local = _manifest(
        tmp_path / "m.parquet",
        {"image_id": ["x", "y", "z"], "uri": ["a/1.jpg", f"s3://{s3_bucket}/top.jpg", "../imgs/b/2.png"]},
    )
    s3_server.put_object(s3_bucket, "imgs/manifest.parquet", Path(local).read_bytes())
    items = list_inputs(f"s3://{s3_bucket}/imgs/manifest.parquet", s3_endpoint=endpoint)
    assert items == [
        InputItem("x", f"s3://{s3_bucket}/imgs/a/1.jpg"),
        InputItem("y", f"s3://{s3_bucket}/top.jpg"),
        InputItem("z", f"s3://{s3_bucket}/imgs/b/2.png"),
    ]
    assert read_bytes([i.uri for i in items], s3_endpoint=endpoint) == [
        b"imgs/a/1.jpg",
        b"top.jpg",
        b"imgs/b/2.png",
    ]
    s3_server.put_object(s3_bucket, "m.csv", "uri\nimgs/a/3.JPEG\n")
    assert list_inputs(f"s3://{s3_bucket}/m.csv", s3_endpoint=endpoint) == [
        InputItem("imgs/a/3.JPEG", f"s3://{s3_bucket}/imgs/a/3.JPEG")
    ]
    # A local manifest may point at s3 objects too.
    assert [i.uri for i in list_inputs(local)][1] == f"s3://{s3_bucket}/top.jpg"


def test_s3_read_bytes_missing(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    endpoint = s3_server.endpoint_url
    uris = [f"s3://{s3_bucket}/top.jpg", f"s3://{s3_bucket}/missing.jpg", "s3://no-such-bucket-xyz/k.jpg"]
    out = read_bytes(uris, s3_endpoint=endpoint, threads=4)
    assert out[0] == b"top.jpg"
    for slot in (1, 2):
        err = out[slot]
        assert isinstance(err, InputReadError)
        assert err.code == ErrorCode.READ_FAILED
        assert uris[slot] in err.message


def test_s3_filesystem_rebuilt_like_a_worker(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    fs, path = pickle.loads(
        pickle.dumps(resolve_filesystem(f"s3://{s3_bucket}/imgs", s3_endpoint=s3_server.endpoint_url))
    )
    names = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    assert f"{s3_bucket}/imgs/a/1.jpg" in names


def test_s3_output_helpers(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    endpoint = s3_server.endpoint_url
    assert output_is_empty(f"s3://{s3_bucket}/out", s3_endpoint=endpoint)
    ensure_output_dir(f"s3://{s3_bucket}/out", s3_endpoint=endpoint)
    assert not output_is_empty(f"s3://{s3_bucket}/imgs", s3_endpoint=endpoint)
    s3_server.put_object(s3_bucket, "out/part-0.parquet", b"x")
    assert not output_is_empty(f"s3://{s3_bucket}/out", s3_endpoint=endpoint)


# ------------------------------------------------------------------------------------------
# Links, special files, stalled reads
# ------------------------------------------------------------------------------------------


def test_symlink_loops_list_every_real_file_once(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for i in range(30):
        _write(root, f"{i:02d}.jpg")
    for i in range(7):
        _write(root, f"sub/{i}.png")
    (root / "sub" / "up").symlink_to("..")  # a link back to the root: today every file 41 times
    items = list_inputs(str(root))
    assert len(items) == 37 and len({i.uri for i in items}) == 37
    assert not any("/up/" in i.uri for i in items)

    selfish = tmp_path / "selfish"
    for i in range(5):
        _write(selfish, f"{i}.jpg")
    (selfish / "a").symlink_to(".")  # two self-links: an exponential listing today
    (selfish / "b").symlink_to(".")
    assert [i.image_id for i in list_inputs(str(selfish))] == [f"{i}.jpg" for i in range(5)]

    # A link out of the tree is followed once; a link to a file listed under its own name is not listed again.
    outside = tmp_path / "outside"
    _write(outside, "o.jpg")
    (root / "ext").symlink_to(outside)
    (root / "ext2").symlink_to(outside)
    (root / "alias.jpg").symlink_to(root / "00.jpg")
    ids = [i.image_id for i in list_inputs(str(root))]
    assert len(ids) == 38 and ids.count("ext/o.jpg") + ids.count("ext2/o.jpg") == 1 and "alias.jpg" not in ids


def test_special_files_in_a_folder_get_error_rows(tmp_path: Path) -> None:
    import socket

    root = tmp_path / "special"
    _write(root, "good.jpg", b"an image")
    (root / "dangling.jpg").symlink_to(root / "missing.jpg")
    (root / "loop.png").symlink_to(root / "loop.png")
    os.mkfifo(root / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.jpg"))
    try:
        items = {i.image_id: i for i in list_inputs(str(root))}
        assert sorted(items) == ["dangling.jpg", "good.jpg", "loop.png", "pipe.jpg", "sock.jpg"]
        assert items["good.jpg"].error is None
        assert "dangling symbolic link" in items["dangling.jpg"].error
        assert "symbolic link loop" in items["loop.png"].error
        assert "FIFO" in items["pipe.jpg"].error and "socket" in items["sock.jpg"].error
        # ... and the decode tasks turn them into read_failed error rows, without opening anything
        plan = storage.plan_inputs(str(root))
        (chunk,) = storage.expand_unit(plan.units[0], 10, storage.ReadOptions(timeout_s=5))
        rows = {s.image_id: s for s in chunk}
        assert rows["good.jpg"].data == b"an image"
        for name in ("dangling.jpg", "loop.png", "pipe.jpg", "sock.jpg"):
            assert (
                rows[name].error.code == ErrorCode.READ_FAILED
                and items[name].error in rows[name].error.message
            )
    finally:
        sock.close()


@pytest.mark.timeout(60)
def test_a_fifo_named_in_a_manifest_is_refused_without_opening(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would block until a writer comes
    _write(tmp_path, "ok.jpg", b"fine")
    manifest = _manifest(tmp_path / "m.csv", {"uri": ["pipe.jpg", "ok.jpg", "/dev/zero"]})
    uris = [i.uri for i in list_inputs(manifest)]
    fifo, ok, device = read_bytes(uris, timeout_s=None)  # no timeout needed: nothing blocks
    assert (
        isinstance(fifo, InputReadError) and "FIFO" in fifo.message and "not a regular file" in fifo.message
    )
    assert ok == b"fine"
    assert isinstance(device, InputReadError) and "character device" in device.message
    with pytest.raises(InputReadError, match="FIFO"):
        storage.open_input(uris[0])


@pytest.fixture()
def stalled_endpoint():
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a stuck object store)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    clients: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                clients.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for client in clients:  # the blocked reads fail now, and their threads end
        client.close()
    server.close()


@pytest.mark.timeout(120)
def test_reads_that_stall_become_errors_after_the_read_timeout(stalled_endpoint: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    started = time.monotonic()
    results = read_bytes(
        [f"s3://stuck/{i}.jpg" for i in range(6)], s3_endpoint=stalled_endpoint, threads=2, timeout_s=1.0
    )
    assert time.monotonic() - started < 30  # 6 stuck reads on 2 threads: each replaced when it times out
    for result in results:
        assert isinstance(result, InputReadError) and result.code == ErrorCode.READ_FAILED
        assert "timed out after 1 s (job.read_timeout_s)" in result.message
    unit = storage.Unit(index=0, kind="webdataset", source="s3://stuck/shard.tar", name="shard.tar")
    (chunk,) = storage.expand_unit(unit, 4, storage.ReadOptions(s3_endpoint=stalled_endpoint, timeout_s=1.0))
    (row,) = chunk  # a tar that cannot be read: one error row, never a failed task
    assert row.image_id == "shard.tar" and "timed out after 1 s" in row.error.message
