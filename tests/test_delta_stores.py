"""Delta Lake tables (delta-rs) on every store the product writes to: local disk, S3 (moto), GCS (emulator).

The table's data files are written with the product's pyarrow filesystems
(``pipeline.storage.resolve_filesystem``) and registered in the transaction log by delta-rs with
``pipeline.storage.delta_location``/``delta_storage_options``. For each store: a table is
created and read back, a claim (the first commit) raced by four processes has one winner, and two
commits of one unit (one app transaction id) conflict. Nothing here starts Ray.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, Schema
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

from pipeline.model.errors import ConfigError
from pipeline.storage import (
    delta_location,
    delta_storage_options,
    join_path,
    resolve_filesystem,
)
from tests.delta_race import ARROW_SCHEMA, claim
from tests.fixtures.gcs import GcsServer
from tests.fixtures.s3 import S3Server

RACERS = 4
# What delta-rs says to a claim that lost the race: the table was there when it looked, or (it
# looked too early) the store refused its create-if-absent write of version 0, which with
# max_commit_retries=0 ends the commit ("0" is that retry limit).
LOST_CLAIM = ("A Delta Lake table already exists at that location.", "Failed to commit transaction: 0")

_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_S3_LOCKING_PROVIDER",
    "STORAGE_EMULATOR_HOST",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


@dataclass
class Store:
    """A table location on one store, and how the product reaches it."""

    uri: str
    objects: Callable[[], list[str]]  # the objects under ``uri``, relative to it, sorted
    settings: dict[str, str] = field(default_factory=dict)  # s3_endpoint for S3

    @property
    def location(self) -> str:
        return delta_location(self.uri)

    @property
    def options(self) -> dict[str, str]:
        return delta_storage_options(self.uri, **self.settings)

    def table(self) -> DeltaTable:
        return DeltaTable(self.location, storage_options=self.options)


@pytest.fixture(params=["local", "s3", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    table = f"features-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        root = tmp_path / table

        def local_keys() -> list[str]:
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

        yield Store(str(root), local_keys)
    elif request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket = s3.create_bucket()
        yield Store(
            f"s3://{bucket}/{table}",
            lambda: [key.removeprefix(f"{table}/") for key in s3.list_keys(bucket, f"{table}/")],
            {"s3_endpoint": s3.endpoint_url},
        )
    else:
        gcs: GcsServer = request.getfixturevalue("gcs_env")  # STORAGE_EMULATOR_HOST for this test
        bucket = gcs.create_bucket()
        yield Store(
            f"gs://{bucket}/{table}",
            lambda: [key.removeprefix(f"{table}/") for key in gcs.list_keys(bucket, f"{table}/")],
        )


def _create(store: Store, **custom_metadata: str) -> None:
    """The claim: version 0, never retried (a retry could turn a lost race into a version 1)."""
    create_table_with_add_actions(
        store.location,
        Schema.from_arrow(ARROW_SCHEMA),
        [],
        mode="error",
        storage_options=store.options,
        commit_properties=CommitProperties(max_commit_retries=0, custom_metadata=custom_metadata or None),
    )


def _write_part(store: Store, name: str, ids: list[str], values: list[int]) -> AddAction:
    """A Parquet data file written as the product's workers write them; its Delta add action."""
    fs, root = resolve_filesystem(store.uri, **store.settings)
    path = join_path(root, name)
    pq.write_table(pa.table({"image_id": ids, "value": values}, schema=ARROW_SCHEMA), path, filesystem=fs)
    size = fs.get_file_info(path).size
    stats = json.dumps({"numRecords": len(ids)})
    return AddAction(name, size, {}, int(time.time() * 1000), True, stats)


def _commit(table: DeltaTable, actions: list[AddAction], unit: str) -> None:
    table.create_write_transaction(
        actions,
        mode="append",
        schema=ARROW_SCHEMA,
        commit_properties=CommitProperties(app_transactions=[Transaction(unit, 1, None)]),
    )


def _rows(table: DeltaTable) -> list[tuple[str, int]]:
    got = table.to_pyarrow_dataset().to_table()
    return sorted(zip(got.column("image_id").to_pylist(), got.column("value").to_pylist(), strict=True))


# ------------------------------------------------------------------------------------------
# Each store: create, commit, read back; the claim race; one unit's concurrent commits
# ------------------------------------------------------------------------------------------


def test_create_commit_checkpoint_and_read_back(store: Store) -> None:
    _create(store, claimed_by="run-1")
    table = store.table()
    assert table.version() == 0
    assert table.history()[0]["claimed_by"] == "run-1"
    assert _rows(table) == []

    add = _write_part(store, "part-000001.parquet", ["a", "b", "c"], [10, 20, 30])
    _commit(table, [add], "unit-000001")
    table = store.table()
    assert table.version() == 1
    assert table.transaction_version("unit-000001") == 1
    assert table.to_pyarrow_dataset().count_rows() == 3
    assert _rows(table) == [("a", 10), ("b", 20), ("c", 30)]
    assert store.objects() == [
        "_delta_log/00000000000000000000.json",
        "_delta_log/00000000000000000001.json",
        "part-000001.parquet",
    ]

    table.create_checkpoint()
    assert "_delta_log/00000000000000000001.checkpoint.parquet" in store.objects()
    reloaded = store.table()  # from the checkpoint now
    assert (reloaded.version(), reloaded.transaction_version("unit-000001")) == (1, 1)
    assert _rows(reloaded) == [("a", 10), ("b", 20), ("c", 30)]


def test_claim_race_has_one_winner(store: Store) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(RACERS), context.Queue()
    racers = [
        context.Process(target=claim, args=(store.location, store.options, i, barrier, results))
        for i in range(RACERS)
    ]
    for racer in racers:
        racer.start()
    try:
        outcomes = dict(results.get(timeout=120) for _ in racers)
    except queue.Empty:
        pytest.fail(f"the racers did not all report: exit codes {[r.exitcode for r in racers]}")
    finally:
        for racer in racers:
            racer.join(timeout=30)
            if racer.is_alive():
                racer.kill()
    winners = [writer for writer, error in outcomes.items() if error is None]
    assert len(winners) == 1, outcomes
    for writer, error in outcomes.items():
        if writer != winners[0]:
            assert any(text in error for text in LOST_CLAIM), error
    table = store.table()
    assert table.version() == 0
    assert table.history()[0]["writer"] == str(winners[0])  # the log holds the winner's claim
    assert store.objects() == ["_delta_log/00000000000000000000.json"]


def test_concurrent_commits_of_one_unit_conflict(store: Store) -> None:
    _create(store)
    first, second, other = store.table(), store.table(), store.table()  # all at version 0
    add_first = _write_part(store, "part-a.parquet", ["x"], [1])
    add_second = _write_part(store, "part-b.parquet", ["x"], [2])
    _commit(first, [add_first], "unit-000007")
    with pytest.raises(CommitFailedError, match="Concurrent transaction failed"):
        _commit(second, [add_second], "unit-000007")
    # A stale handle committing another unit is not a conflict: appends do not conflict.
    _commit(other, [_write_part(store, "part-c.parquet", ["y"], [3])], "unit-000008")

    table = store.table()
    assert table.version() == 2
    assert (table.transaction_version("unit-000007"), table.transaction_version("unit-000008")) == (1, 1)
    assert _rows(table) == [("x", 1), ("y", 3)]  # the refused commit's file is in no version


# ------------------------------------------------------------------------------------------
# delta_location / delta_storage_options (no server)
# ------------------------------------------------------------------------------------------


def test_delta_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert delta_location("out/table") == str(tmp_path / "out" / "table")
    assert delta_location(f"file://{tmp_path}/a%20b/") == str(tmp_path / "a b")
    assert delta_location("~/t") == str(tmp_path / "home" / "t")
    assert delta_location("s3://bucket/features/run1/") == "s3://bucket/features/run1"
    assert delta_location("gcs://bucket/features") == "gs://bucket/features"
    assert delta_location("gs://bucket") == "gs://bucket"
    with pytest.raises(ConfigError, match="bucket"):
        delta_location("s3:///features")
    with pytest.raises(ConfigError, match="scheme"):
        delta_location("hdfs://nn/features")


def _pyarrow_s3(uri: str, **settings: str) -> tuple[str, str]:
    """``(endpoint URL, region)`` of the pyarrow S3 filesystem the product builds (what it pickles)."""
    options = resolve_filesystem(uri, **settings)[0].__reduce__()[1][0]
    return f"{options['scheme']}://{options['endpoint_override']}", options["region"]


def test_s3_options_follow_the_filesystem_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"conditional_put": "etag", "AWS_FORCE_CREDENTIAL_LOAD": "true"}
    explicit = delta_storage_options("s3://b/t", s3_endpoint="http://127.0.0.1:9")
    assert explicit == {
        **base,
        "aws_endpoint": "http://127.0.0.1:9",
        "aws_endpoint_url_s3": "http://127.0.0.1:9",
        "allow_http": "true",
        "aws_region": "us-east-1",
    }
    assert _pyarrow_s3("s3://b/t", s3_endpoint="http://127.0.0.1:9") == ("http://127.0.0.1:9", "us-east-1")

    # The environment: AWS_ENDPOINT_URL_S3 beats AWS_ENDPOINT_URL, AWS_REGION beats AWS_DEFAULT_REGION;
    # a bare host:port is https (no allow_http).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "127.0.0.1:2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    from_env = delta_storage_options("s3://b/t")
    assert from_env == {
        **base,
        "aws_endpoint": "https://127.0.0.1:2",
        "aws_endpoint_url_s3": "https://127.0.0.1:2",
        "aws_region": "eu-west-3",
    }
    assert _pyarrow_s3("s3://b/t") == ("https://127.0.0.1:2", "eu-west-3")
    # The explicit settings beat the environment, for both clients.
    settings = {"s3_endpoint": "http://127.0.0.1:3", "s3_region": "ap-south-1"}
    explicit = delta_storage_options("s3://b/t", **settings)
    assert (explicit["aws_endpoint_url_s3"], explicit["aws_region"]) == _pyarrow_s3("s3://b/t", **settings)
    assert explicit["aws_endpoint_url_s3"] == "http://127.0.0.1:3"

    with pytest.raises(ConfigError, match="endpoint"):
        delta_storage_options("s3://b/t", s3_endpoint="ftp://127.0.0.1:4")


def test_s3_locking_provider_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_S3_LOCKING_PROVIDER", "dynamodb")
    with pytest.raises(ConfigError, match=r"AWS_S3_LOCKING_PROVIDER=dynamodb .* conditional writes"):
        delta_storage_options("s3://b/t", s3_endpoint="http://127.0.0.1:9")
    assert delta_storage_options("gs://b/t") == {}  # an S3 setting: other stores ignore it
    assert delta_storage_options("relative/t") == {}


def test_gcs_options(monkeypatch: pytest.MonkeyPatch) -> None:
    assert delta_storage_options("gs://b/t") == {}  # Google's default credentials, as pyarrow
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:5")  # no scheme: http
    options = delta_storage_options("gcs://b/t")
    key = json.loads(options.pop("google_service_account_key"))
    assert options == {"google_base_url": "http://127.0.0.1:5", "allow_http": "true"}
    assert (key["gcs_base_url"], key["disable_oauth"]) == ("http://127.0.0.1:5", True)
    pyarrow_options = resolve_filesystem("gs://b/t")[0].__reduce__()[1][0]
    assert (pyarrow_options["scheme"], pyarrow_options["endpoint_override"]) == ("http", "127.0.0.1:5")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "https://gcs.internal:8443")
    assert "allow_http" not in delta_storage_options("gs://b/t")
    assert delta_storage_options("gs://b/t")["google_base_url"] == "https://gcs.internal:8443"


def test_no_options_for_local_paths(tmp_path: Path) -> None:
    assert delta_storage_options(str(tmp_path)) == {}
    assert delta_storage_options(f"file://{tmp_path}", s3_endpoint="http://127.0.0.1:9") == {}
    assert os.path.isabs(delta_location(str(tmp_path)))
