"""The job's input kinds without Ray: planning units (pipeline.storage.plan_inputs) and expanding them
(expand_unit, as a decode task does) for WebDataset shards, Parquet files of images and sharded
manifests; brace patterns; what the plan fingerprint covers; locally and on S3 (moto)."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.model.errors import ConfigError, ErrorCode
from pipeline.storage import (
    InputOptions,
    ReadOptions,
    Unit,
    expand_braces,
    expand_unit,
    plan_inputs,
)
from pipeline.storage.manifest import hash_strings
from tests.datasets import (
    photo_bytes,
    sample_members,
    tar_bytes,
    truncate_inside_last_member,
    write_image_parquet,
    write_shards,
)

_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "STORAGE_EMULATOR_HOST")


@pytest.fixture(autouse=True)
def _clean_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _AWS_ENV:
        monkeypatch.delenv(name, raising=False)


def _samples(plan, shard_size: int | None = None, **read):
    """Every sample of the plan, expanded like the decode tasks do: [(unit, piece, sample)]."""
    options = ReadOptions(**read)
    out = []
    for unit in plan.units:
        again = Unit.from_row(unit.to_row())  # across the Ray hop
        assert again.rows == unit.rows
        for piece, chunk in enumerate(expand_unit(again, shard_size or plan.shard_size, options)):
            out += [(unit.index, piece, s) for s in chunk]
    return out


# ------------------------------------------------------------------------------------------
# Brace patterns
# ------------------------------------------------------------------------------------------


def test_expand_braces_like_webdataset():
    assert expand_braces("s/{00000..00003}.tar") == [f"s/{i:05d}.tar" for i in range(4)]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("x/{8..11}.tar") == ["x/8.tar", "x/9.tar", "x/10.tar", "x/11.tar"]  # no padding
    assert expand_braces("{0..6..3}") == ["0", "3", "6"]
    assert expand_braces("{a,{b,c}d}") == ["a", "bd", "cd"]
    assert expand_braces("plain{}.tar") == ["plain{}.tar"]  # not an expression: stays as written
    assert expand_braces("{x}.tar") == ["{x}.tar"]


# ------------------------------------------------------------------------------------------
# WebDataset shards
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path / "shards", write_shards(tmp_path / "shards", shards=3, per_shard=5)


@pytest.mark.parametrize("how", ["prefix", "glob", "braces"])
def test_webdataset_plan_lists_tars_and_reads_none(shards, how):
    folder, expected = shards
    (folder / "notes.md").write_text("not a shard")
    inp = {"prefix": str(folder), "glob": f"{folder}/*.tar", "braces": f"{folder}/{{00000..00002}}.tar"}[how]
    plan = plan_inputs(inp, shard_size=2)
    assert plan.kind == "webdataset" and len(plan.units) == 3 and plan.rows is None  # not read when planning
    assert [u.name for u in plan.units] == ["00000.tar", "00001.tar", "00002.tar"]
    assert plan.shards() is None and plan.source_bytes == sum(p.stat().st_size for p in folder.glob("*.tar"))
    got = _samples(plan, keep_columns=("caption", "url", "json"))
    assert [s.image_id for _, _, s in got] == sorted(expected)  # member order, every sample once
    pieces = [(u, p) for u, p, _ in got]
    assert pieces.count((0, 0)) == 2 and pieces.count((0, 2)) == 1  # 5 samples → files of 2, 2, 1
    for _, _, s in got:
        want = expected[s.image_id]
        assert s.uri == f"{folder / want['tar']}#{want['member']}"
        assert s.error is None and s.data[:2] == b"\xff\xd8"
        assert s.carried["caption"] == want["caption"] and s.carried["url"] == want["url"]
        assert '"key"' in s.carried["json"]  # a sidecar carried by its extension


def test_webdataset_missing_named_shard_is_an_error(shards):
    folder, _ = shards
    with pytest.raises(ConfigError, match=r"1 of the 4 files named by .* do not exist, e\.g\. .*00003\.tar"):
        plan_inputs(f"{folder}/{{00000..00003}}.tar")
    with pytest.raises(ConfigError, match="limit"):
        plan_inputs(str(folder), limit=3)


def test_webdataset_bad_tars_give_error_rows_never_a_failure(tmp_path: Path):
    folder = tmp_path / "bad"
    folder.mkdir()
    good, other = photo_bytes(2)
    members = [
        *sample_members("a/000", good, caption="first", meta={"key": "first-key"}),
        ("a/000.cls", b"7"),  # a second member of the same sample
        *sample_members("a/001", b"\xff\xd8 not really a jpeg", caption="corrupt image"),
        *sample_members("a/002", None, caption="no image at all"),
        *sample_members("a/003", other, ext="png"),
        ("README", b"no extension: not a sample"),
        *sample_members("a/004", good, caption="the last, cut short"),
    ]
    full = tar_bytes(members)
    (folder / "0-complete.tar").write_bytes(full)
    (folder / "1-truncated.tar").write_bytes(truncate_inside_last_member(full))
    (folder / "2-not-a-tar.tar").write_bytes(b"hello " * 200)
    (folder / "3-empty.tar").write_bytes(b"")
    first_sample = tar_bytes(members[:4])  # the first sample, then the tar stops between two members
    with tarfile.open(fileobj=io.BytesIO(first_sample)) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    (folder / "4-cut-between-members.tar").write_bytes(first_sample[:end])
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        header = tf.getmembers()[4].offset  # a/001.jpg, the second sample's first member
    corrupt = bytearray(full)
    corrupt[header : header + 64] = b"\x01" * 64
    (folder / "5-corrupt-header.tar").write_bytes(bytes(corrupt))
    plan = plan_inputs(str(folder))
    got = {}
    for _, _, s in _samples(plan, keep_columns=("caption", "cls"), max_bytes=1 << 20):
        got.setdefault(Path(s.uri.split("#")[0]).name, []).append(s)

    complete = got["0-complete.tar"]
    assert [s.image_id for s in complete] == ["first-key", "a/001", "a/002", "a/003", "a/004"]
    assert complete[0].carried == {"caption": "first", "cls": "7"} and complete[0].data == good
    assert (
        complete[1].data.startswith(b"\xff\xd8") and complete[1].error is None
    )  # the decode guard says corrupt
    assert complete[2].error.code == ErrorCode.READ_FAILED and "no image member" in complete[2].error.message
    assert complete[3].uri.endswith("#a/003.png") and complete[3].data == other

    truncated = got["1-truncated.tar"]
    assert [s.image_id for s in truncated] == ["first-key", "a/001", "a/002", "a/003", "a/004"]
    assert (
        truncated[-1].error.code == ErrorCode.TRUNCATED
        and "ends inside member a/004.txt" in truncated[-1].error.message  # its caption
    )

    (not_a_tar,) = got["2-not-a-tar.tar"]
    assert not_a_tar.image_id == "2-not-a-tar.tar" and "not a readable tar" in not_a_tar.error.message
    (empty,) = got["3-empty.tar"]
    assert empty.error.code == ErrorCode.READ_FAILED
    cut_rows = got["4-cut-between-members.tar"]
    assert [s.image_id for s in cut_rows] == ["first-key", f"4-cut-between-members.tar@{end}"]
    assert cut_rows[-1].error.code == ErrorCode.TRUNCATED and "ends early" in cut_rows[-1].error.message
    corrupt_rows = got["5-corrupt-header.tar"]
    assert [s.image_id for s in corrupt_rows] == ["first-key", f"5-corrupt-header.tar@{header}"]
    assert "corrupt tar header" in corrupt_rows[-1].error.message


def test_webdataset_linked_image_members_get_read_failed_rows(tmp_path: Path):
    """A sample whose image is a symbolic or hard link (no data in the tar) gets a read_failed row, never
    nothing; links are not followed."""
    good = photo_bytes(1)[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (("s/000.jpg", good), ("s/000.txt", b"real")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind, target in (
            ("s/001.jpg", tarfile.SYMTYPE, "/etc/passwd"),
            ("s/002.jpg", tarfile.LNKTYPE, "s/000.jpg"),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
        info = tarfile.TarInfo("s/002.txt")
        info.size = 6
        tf.addfile(info, io.BytesIO(b"linked"))
    (tmp_path / "links.tar").write_bytes(buf.getvalue())
    got = [s for _, _, s in _samples(plan_inputs(str(tmp_path / "links.tar")), keep_columns=("txt",))]
    assert [s.image_id for s in got] == ["s/000", "s/001", "s/002"]
    assert got[0].data == good and got[0].error is None
    assert (
        got[1].error.code == ErrorCode.READ_FAILED
        and "symbolic link to '/etc/passwd'" in got[1].error.message
    )
    assert got[2].error.code == ErrorCode.READ_FAILED and "hard link to 's/000.jpg'" in got[2].error.message
    assert got[2].uri.endswith("links.tar#s/002.jpg") and got[2].carried == {"txt": "linked"}


def test_file_names_that_are_not_utf8_plan_read_and_keep_their_bytes(tmp_path: Path):
    """A POSIX name is bytes: one that is not UTF-8 is planned, crosses the Ray hop, is read, and is
    stored as text that gives its bytes back (each odd byte as \\xNN, each backslash doubled)."""
    from pipeline.storage.names import name_bytes, name_text
    from pipeline.table import InputRows

    folder = tmp_path / "odd"
    folder.mkdir()
    good = photo_bytes(1)[0]
    raw = b"bad\xff\xfe name\\x.jpg"
    with open(os.path.join(os.fsencode(folder), raw), "wb") as f:
        f.write(good)
    (folder / "plain.jpg").write_bytes(good)
    plan = plan_inputs(str(folder))
    assert plan.rows == 2 and len(plan.fingerprint) == 64
    samples = {s.image_id: s for _, _, s in _samples(plan)}
    odd = os.fsdecode(raw)
    assert set(samples) == {odd, "plain.jpg"} and samples[odd].data == good  # read by its real name
    rows = InputRows()
    rows.add_ok(odd, samples[odd].uri)
    text = rows.image_id[0]
    assert text == "bad\\xff\\xfe name\\\\x.jpg" and text.encode("utf-8")  # valid UTF-8
    assert name_bytes(text) == raw and name_bytes(rows.uri[0]) == os.fsencode(folder) + b"/" + raw
    assert name_text("plain.jpg") == "plain.jpg"


# ------------------------------------------------------------------------------------------
# Parquet files with image bytes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_images_units_from_footers(tmp_path: Path, struct: bool):
    images = photo_bytes(9)
    images[4] = None  # a row without bytes
    write_image_parquet(
        tmp_path / "ds" / "train-00000.parquet",
        images,
        struct=struct,
        ids=[f"id-{i}" for i in range(9)],
        columns={
            "caption": [f"caption {i}" for i in range(9)],
            "score": [i / 2 for i in range(9)],
            "n": list(range(9)),
        },
        row_group_size=2,
    )
    write_image_parquet(
        tmp_path / "ds" / "train-00001.parquet",
        photo_bytes(3),
        struct=struct,
        ids=["x", "y", "z"],
        columns={"caption": ["a", "b", "c"], "score": [1.0, 2.0, 3.0], "n": [1, 2, 3]},
    )
    options = InputOptions(image_column="image", id_column="id", keep_columns=("caption", "score", "n"))
    plan = plan_inputs(str(tmp_path / "ds"), options=options, shard_size=3)
    assert (
        plan.kind == "parquet"
        and plan.rows == 12
        and plan.carried == {"caption": "string", "score": "float64", "n": "int64"}
    )
    # whole row groups of at least 3 rows: (2+2), (2+2), (1); then the second file's one group
    assert [(u.start, u.stop, u.row_groups) for u in plan.units[:3]] == [
        (0, 4, (0, 1)),
        (4, 8, (2, 3)),
        (8, 9, (4,)),
    ]
    got = _samples(
        plan, **{"image_column": "image", "id_column": "id", "keep_columns": ("caption", "score", "n")}
    )
    assert [s.image_id for _, _, s in got] == [f"id-{i}" for i in range(9)] + ["x", "y", "z"]
    assert [(u, p) for u, p, _ in got][:5] == [(0, 0), (0, 0), (0, 0), (0, 1), (1, 0)]
    assert got[4][2].error.code == ErrorCode.READ_FAILED and "holds no image bytes" in got[4][2].error.message
    assert got[0][2].data == images[0] and got[0][2].uri == f"{tmp_path / 'ds' / 'train-00000.parquet'}#0"
    assert got[7][2].carried == {"caption": "caption 7", "score": 3.5, "n": 7}
    # without an id column: <file>#<row>
    plan = plan_inputs(str(tmp_path / "ds"), options=InputOptions(image_column="image"), limit=10)
    ids = [s.image_id for _, _, s in _samples(plan, image_column="image")]
    assert plan.rows == 10 and ids[8] == "train-00000.parquet#8" and ids[9] == "train-00001.parquet#0"


def test_parquet_images_rows_without_an_id_get_error_rows(tmp_path: Path):
    write_image_parquet(tmp_path / "a.parquet", photo_bytes(3), ids=["x", None, " "])
    plan = plan_inputs(
        str(tmp_path / "a.parquet"), options=InputOptions(image_column="image", id_column="id")
    )
    got = [s for _, _, s in _samples(plan, image_column="image", id_column="id")]
    assert [s.image_id for s in got] == ["x", "a.parquet#1", "a.parquet#2"]  # never a null key
    assert got[0].error is None and got[0].data is not None
    assert all(s.error.code == ErrorCode.READ_FAILED for s in got[1:])
    assert "'id' (input.id_column) is null" in got[1].error.message and "is empty" in got[2].error.message


def test_parquet_images_bad_columns_and_rows_never_read_when_planning(tmp_path: Path):
    write_image_parquet(
        tmp_path / "a.parquet", photo_bytes(2), ids=["same", "same"], columns={"tags": [["x"], ["y"]]}
    )
    options = InputOptions(image_column="image", id_column="id")
    plan = plan_inputs(
        str(tmp_path / "a.parquet"), options=options
    )  # footers only: ids are taken as they are
    assert [s.image_id for _, _, s in _samples(plan, image_column="image", id_column="id")] == [
        "same",
        "same",
    ]
    with pytest.raises(ConfigError, match="no column 'picture'"):
        plan_inputs(str(tmp_path / "a.parquet"), options=InputOptions(image_column="picture"))
    with pytest.raises(ConfigError, match="column 'id' is string"):
        plan_inputs(str(tmp_path / "a.parquet"), options=InputOptions(image_column="id"))
    with pytest.raises(ConfigError, match="'tags' is list"):
        plan_inputs(
            str(tmp_path / "a.parquet"), options=InputOptions(image_column="image", keep_columns=("tags",))
        )
    with pytest.raises(ConfigError, match="needs input.image_column"):
        plan_inputs(str(tmp_path / "a.parquet"), options=InputOptions(format="parquet"))


# ------------------------------------------------------------------------------------------
# Sharded manifests
# ------------------------------------------------------------------------------------------


def test_sharded_manifests_parquet_and_csv(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    uris = []
    for i, data in enumerate(photo_bytes(7)):
        (images / f"{i}.jpg").write_bytes(data)
        uris.append(f"../images/{i}.jpg")
    pq.write_table(
        pa.table(
            {"uri": uris[:5], "image_id": [f"m{i}" for i in range(5)], "caption": [f"c{i}" for i in range(5)]}
        ),
        manifests / "part-0.parquet",
        row_group_size=2,
    )
    pacsv.write_csv(
        pa.table({"uri": uris[5:], "image_id": ["m5", "m6"], "caption": ["c5", "c6"]}),
        manifests / "part-1.csv",
    )
    for inp in (str(manifests), f"{manifests}/part-*"):
        plan = plan_inputs(inp, shard_size=2, options=InputOptions(keep_columns=("caption",)))
        assert plan.kind == "manifest" and plan.files == 2 and plan.rows == 7
        assert [u.rows for u in plan.units] == [2, 2, 1, 2]
        assert (
            plan.units[2].row_groups == (2,) and plan.units[3].kind == "items"
        )  # CSV rows travel in the unit
        got = _samples(plan, keep_columns=("caption",))
        assert [s.image_id for _, _, s in got] == [f"m{i}" for i in range(7)]
        assert [s.carried["caption"] for _, _, s in got] == [f"c{i}" for i in range(7)]
        assert [s.data for _, _, s in got] == [(images / f"{i}.jpg").read_bytes() for i in range(7)]
    assert plan_inputs(str(manifests), shard_size=2, limit=3).rows == 3
    tagged = tmp_path / "tagged.parquet"  # a column that cannot be carried: an error naming the manifest
    pq.write_table(pa.table({"uri": uris[:1], "tags": [["a", "b"]]}), tagged)
    with pytest.raises(ConfigError, match=r"Manifest .*tagged\.parquet: column 'tags' is list"):
        plan_inputs(str(tagged), options=InputOptions(keep_columns=("tags",)))
    pacsv.write_csv(pa.table({"uri": ["../images/0.jpg"], "image_id": ["m3"]}), manifests / "part-2.csv")
    with pytest.raises(
        ConfigError,
        match=r"manifests of .* have 1 duplicate image_id .*'m3' in .*part-0\.parquet data row 4 and .*part-2\.csv data row 1",
    ):
        plan_inputs(str(manifests))


def test_row_check_finds_every_duplicate_in_many_rows(tmp_path: Path):
    """The duplicate check works on hashes of 10⁵ long ids and confirms them on the values."""
    ids = [f"s3://bucket/some/long/common/prefix/{i:08d}.jpg" for i in range(100_000)]
    assert len(set(hash_strings(pa.array(ids)).tolist())) == len(ids)
    assert hash_strings(pa.array(["ab", "ab", "", "a\x00"]))[0] == hash_strings(pa.array(["ab"]))[0]
    pq.write_table(pa.table({"uri": ids}), tmp_path / "a.parquet", row_group_size=30_000)
    assert plan_inputs(str(tmp_path / "a.parquet")).rows == 100_000
    pq.write_table(pa.table({"uri": [*ids[:70_000], ids[12_345], *ids[70_000:]]}), tmp_path / "b.parquet")
    with pytest.raises(
        ConfigError, match=r"1 duplicate uri \(used as image_id\).*00012345\.jpg.*rows 12346 and 70001"
    ):
        plan_inputs(str(tmp_path / "b.parquet"))


def test_non_utf8_manifests_are_typed_errors_naming_the_file(tmp_path: Path):
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("uri,image_id\ncaf\xe9.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.csv is not valid UTF-8"):
        plan_inputs(str(csv))
    parquet = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"uri": pa.array([b"caf\xe9.jpg"], pa.binary())}), parquet)
    with pytest.raises(ConfigError, match=r"binary\.parquet: the 'uri' column is not valid UTF-8"):
        plan_inputs(str(parquet))


# ------------------------------------------------------------------------------------------
# The plan fingerprint
# ------------------------------------------------------------------------------------------


def test_plan_fingerprint_covers_units_sizes_mtimes_and_rows(tmp_path: Path, shards):
    folder, _ = shards
    fp = plan_inputs(str(folder)).fingerprint
    assert plan_inputs(str(folder)).fingerprint == fp  # stable
    assert plan_inputs(str(folder), shard_size=7).fingerprint != fp
    assert plan_inputs(str(folder), options=InputOptions(keep_columns=("caption",))).fingerprint != fp
    tar = folder / "00001.tar"
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: same bytes, new mtime
    assert plan_inputs(str(folder)).fingerprint != fp
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["a.jpg", "b.jpg"]}), manifest)
    first = plan_inputs(str(manifest)).fingerprint
    time.sleep(0.01)
    pq.write_table(pa.table({"uri": ["a.jpg", "b.jpg", "c.jpg"]}), manifest)  # one row more
    assert plan_inputs(str(manifest)).fingerprint != first


# ------------------------------------------------------------------------------------------
# S3 (moto): tar shards and Parquet images planned and read from a real server
# ------------------------------------------------------------------------------------------


def test_s3_webdataset_and_parquet_images(s3_server, tmp_path: Path):
    endpoint = s3_server.endpoint_url
    bucket = s3_server.create_bucket("inputs-containers")
    expected = write_shards(tmp_path / "shards", shards=3, per_shard=2)
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        s3_server.put_object(bucket, f"wds/{tar.name}", tar.read_bytes())
    s3_server.put_object(bucket, "wds/_info.json", b"{}")
    for inp in (f"s3://{bucket}/wds", f"s3://{bucket}/wds/*.tar", f"s3://{bucket}/wds/{{00000..00002}}.tar"):
        plan = plan_inputs(inp, s3_endpoint=endpoint)
        assert plan.kind == "webdataset" and [u.source for u in plan.units] == [
            f"s3://{bucket}/wds/{i:05d}.tar" for i in range(3)
        ]
        got = _samples(plan, s3_endpoint=endpoint, keep_columns=("caption",))
        assert [s.image_id for _, _, s in got] == sorted(expected)
        assert all(s.carried["caption"] == expected[s.image_id]["caption"] and s.data for _, _, s in got)
    images = photo_bytes(4)
    path = write_image_parquet(tmp_path / "hf.parquet", images, ids=list("abcd"), row_group_size=2)
    s3_server.put_object(bucket, "hf/data/train-0.parquet", path.read_bytes())
    plan = plan_inputs(
        f"s3://{bucket}/hf/data",
        s3_endpoint=endpoint,
        shard_size=2,
        options=InputOptions(image_column="image", id_column="id"),
    )
    assert plan.rows == 4 and len(plan.units) == 2
    got = _samples(plan, s3_endpoint=endpoint, image_column="image", id_column="id")
    assert [(s.image_id, s.data) for _, _, s in got] == list(zip("abcd", images, strict=True))
    assert got[3][2].uri == f"s3://{bucket}/hf/data/train-0.parquet#3"


# ------------------------------------------------------------------------------------------
# encode --dry-run
# ------------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_starts_no_ray(tiny_llava, tmp_path: Path):
    import json
    import subprocess
    import sys

    pq.write_table(pa.table({"uri": [f"s3://b/{i}.jpg" for i in range(10)]}), tmp_path / "m.parquet")
    write_shards(tmp_path / "shards", shards=3, per_shard=2)
    code = (
        "import json, sys\n"
        "from llava_features.cli import main\n"
        "rc = [main(argv) for argv in json.loads(sys.argv[1])]\n"
        "print('RESULT', rc, sorted(m for m in ('ray', 'ray.data') if m in sys.modules))\n"
    )
    common = ["--model", str(tiny_llava), "--dtype", "float32", "--dry-run"]
    runs = [
        [
            "encode",
            "--input",
            str(tmp_path / "m.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--shard-size",
            "4",
            *common,
        ],
        [
            "encode",
            "--input",
            f"{tmp_path}/shards/{{00000..00002}}.tar",
            "--output",
            str(tmp_path / "out2"),
            *common,
        ],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(runs)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.strip().splitlines()[-1] == "RESULT [0, 0] []", proc.stderr[-3000:]  # Ray never imported
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()  # nothing written
    manifest, shards = out.split("input:")[1:3]
    assert (
        "(manifest: 1 file(s)" in manifest
        and "units:         3\n" in manifest
        and "rows:          10\n" in manifest
    )
    assert "shards:        3 (up to 4 rows each)" in manifest
    assert "features [16, 64] (4.1 kB per row)" in manifest and "output bytes:  ~41.0 kB" in manifest
    assert "(empty: a new table)" in manifest
    assert (
        "(webdataset: 3 file(s)" in shards and "rows:          0 known; 3 unit(s) counted when read" in shards
    )
    assert "shards:        at least 3" in shards
