"""The benchmark harness (``pipeline/bench/``, ``deployments/bench.py``, the runners of
``llava_features/bench.py``), on CPU.

- ``bench encoder --tiny`` through ``llava_features.cli.main`` writes sane JSON;
- the FLOP count of ViT-L/14-336 layer -2 + mlp2x_gelu is the H100 anchor's 389.5 GFLOP (±1 %);
- the runners: options built from the flags and typed ``--opt`` (errors name the key), ``all`` (a
  missing dependency is a skip, a failure an error), every options field documented;
- timing helpers, the sink, table, plan and pipeline benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.bench.sink as sink_module
from deployments.bench import ServeOptions, SharedPoolOptions
from llava_features import bench as bench_cli
from llava_features.cli import main as cli_main
from pipeline.bench.arch import KNOWN_TOWERS, bench_arch, tiny_arch
from pipeline.bench.encoder import EncoderOptions
from pipeline.bench.flops import encoder_flops
from pipeline.bench.pipeline import PipelineOptions
from pipeline.bench.plan import PlanOptions
from pipeline.bench.preprocess import PreprocessOptions
from pipeline.bench.profile import ProfileOptions
from pipeline.bench.report import format_table, write_json
from pipeline.bench.sink import SinkOptions
from pipeline.bench.table import TableOptions
from pipeline.config import Config, load_config
from pipeline.measure.timing import percentiles_ms, time_callable
from pipeline.model.config import field_docs

REPO = Path(__file__).resolve().parent.parent
VIT_L = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]


# -- FLOPs and architectures ------------------------------------------------------------------


def test_flops_vit_l_336_layer_minus_2_mlp2x_matches_anchor():
    flops = encoder_flops(
        VIT_L,
        select_layer=-2,
        select_feature="patch",
        projector_type="mlp2x_gelu",
        mm_hidden_size=1024,
        hidden_size=4096,
    )
    assert flops["layers_used"] == 23
    assert flops["tokens"] == 577
    assert flops["total"] == pytest.approx(389.5e9, rel=0.01)
    # ANCHORS.md's 389.5 is the layers + projector; the patch embedding adds 0.69 GFLOP.
    assert flops["total"] - flops["patch_embed"] == pytest.approx(389.5e9, rel=1e-4)
    assert flops["patch_embed"] == pytest.approx(0.6936e9, rel=1e-3)
    # Deeper selection costs more, identity projector costs nothing.
    last = encoder_flops(VIT_L, select_layer=-1, select_feature="cls_patch", projector_type="identity")
    assert last["layers_used"] == 24 and last["projector"] == 0
    assert last["layers"] == pytest.approx(flops["layers"] * 24 / 23)


def test_bench_arch_from_known_table_for_configs():
    arch = bench_arch(load_config(REPO / "configs" / "llava-v1.5-7b.yaml"))
    assert arch.source in ("table", "checkpoint")
    assert arch.vision_config["hidden_size"] == 1024 and arch.vision_config["image_size"] == 336
    assert (arch.select_layer, arch.projector_type, arch.hidden_size) == (-2, "mlp2x_gelu", 4096)
    assert arch.flops()["total"] == pytest.approx(389.5e9, rel=0.01)
    assert arch.num_tokens == 576 and arch.feature_dim == 4096
    arch13 = bench_arch(load_config(REPO / "configs" / "llava-v1.5-13b.yaml"))
    assert arch13.hidden_size == 5120
    cfg = Config()
    unknown = replace(cfg, model=replace(cfg.model, checkpoint="nobody/not-a-model"))
    with pytest.raises(ValueError, match="not a known tower"):
        bench_arch(unknown)


# -- the harness through the CLI --------------------------------------------------------------


def test_bench_encoder_tiny_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli_main(
        [
            "bench",
            "encoder",
            "--tiny",
            "--batch-sizes",
            "2,4",
            "--warmup",
            "2",
            "--repeats",
            "3",
            "--variants",
            "plain",
            "--ceiling-size",
            "256",
            "--anyres-images",
            "3",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["env"]["versions"]["torch"]
    enc = payload["results"]["encoder"]
    assert enc["device"] == "cpu"
    assert enc["ceiling"]["tflops"] > 0 and enc["ceiling"]["images_per_s"] > 0
    assert enc["flops_per_image"] == pytest.approx(tiny_arch().flops()["total"])
    assert 1e5 < enc["flops_per_image"] < 1e8  # tiny: 56 px, 3 layers of width 32
    assert [r["batch_size"] for r in enc["rows"]] == [2, 4]
    for row in enc["rows"]:
        assert row["ours_images_per_s"] > 0
        assert row["seed_images_per_s"] > 0
        assert row["ours_host_images_per_s"] > 0
        assert row["ratio_vs_seed"] > 0
        assert row["ours_fraction_of_ceiling"] > 0
        assert set(row["variants"]) == {"fast", "plain"}
    assert enc["rel_error"]["ours_vs_fp32_seed"] < 1e-5  # float32 on CPU
    assert enc["rel_error"]["variants_vs_fp32_seed"]["plain"] < 1e-5
    from pipeline.bench.encoder import ANYRES_MIX, anyres_pinpoints
    from pipeline.model.anyres import grid_for

    anyres = enc["anyres"]  # the first 3 sizes of the mix on LLaVA-NeXT's grid for 56 px tiles
    grids = [grid_for(size, anyres_pinpoints(56), 56) for size in ANYRES_MIX[:3]]
    per_image = sum(1 + g.num_tiles for g in grids) / 3
    assert anyres["images"] == 3 and anyres["mean_tiles_per_image"] == pytest.approx(per_image)
    tiles, packed = anyres["outputs"]["tiles"], anyres["outputs"]["packed"]
    assert tiles["tokens_per_image"] == pytest.approx(per_image * 16)  # [1 + tiles, 16 tokens] per image
    assert 16 < packed["tokens_per_image"] < per_image * 16 + 16  # base + unpadded grid + newlines
    for v in (tiles, packed):
        assert v["images_per_s"] > 0 and v["tiles_per_s"] == pytest.approx(per_image * v["images_per_s"])
        assert v["tiles_vs_host_images"] > 0
    printed = capsys.readouterr().out
    assert "ours img/s" in printed and "×seed" in printed and "anyres (LLaVA-NeXT)" in printed


def test_bench_needs_config_or_tiny():
    assert cli_main(["bench", "encoder"]) == 2
    assert cli_main(["bench", "all"]) == 2


def test_bench_preprocess_needs_no_model_and_measures_the_tiny_size(tmp_path):
    """preprocess runs without --config/--tiny (LLaVA-1.5's 336 px); --tiny measures the tiny
    architecture's 56 px, not 336."""
    for flags, size in (([], 336), (["--tiny"], 56)):
        out = tmp_path / f"pre-{size}.json"
        argv = ["bench", "preprocess", *flags, "--opt", "seconds=0.05", "--json", str(out)]
        assert cli_main(argv) == 0
        result = json.loads(out.read_text())["results"]["preprocess"]
        assert result["size"] == size and result["max_abs_diff"] < 1e-5
        assert result["ours_images_per_s"] > 0 and result["hf_images_per_s"] > 0


def _fake_sink(monkeypatch, calls):
    """``bench sink`` records the options it is given instead of measuring."""

    def bench_sink(options):
        calls.append(options)
        return {"rows": options.rows, "results": {"binary": {"write_mb_s": 123.0}}}

    monkeypatch.setattr(sink_module, "bench_sink", bench_sink)


def test_bench_sink_with_tiny_writes_the_tiny_shapes(monkeypatch):
    calls: list = []
    _fake_sink(monkeypatch, calls)
    assert cli_main(["bench", "sink", "--tiny", "--opt", "rows=2"]) == 0
    arch = tiny_arch()
    assert (
        (calls[0].tokens, calls[0].dim, calls[0].rows)
        == (arch.num_tokens, arch.feature_dim, 2)
        == (16, 64, 2)
    )


def test_bench_options_come_from_flags_and_typed_opts(monkeypatch, tmp_path):
    calls: list = []
    _fake_sink(monkeypatch, calls)
    out = tmp_path / "sink.json"
    argv = ["bench", "sink", "--repeats", "2", "--opt", "rows=4", "--opt", "compression=zstd"]
    assert cli_main([*argv, "--opt", 'formats=["binary"]', "--json", str(out)]) == 0
    options = calls[0]  # needs neither --config nor --tiny: LLaVA-1.5's 576 x 4096 features
    assert (options.rows, options.tokens, options.dim, options.repeats) == (4, 576, 4096, 2)
    assert (options.compression, options.formats, options.fsync) == ("zstd", ("binary",), True)
    payload = json.loads(out.read_text())
    assert payload["results"]["sink"]["rows"] == 4
    assert type(options)(**payload["bench_options"]["sink"]) == options  # the JSON rebuilds the same options


@pytest.mark.parametrize(
    ("opt", "message"),
    [
        ("rows=many", "bench.sink.rows: expected an integer, got 'many'"),
        ("rows=0", "bench.sink.rows must be >= 1, got 0"),
        ("formats=binary", "bench.sink.formats: expected a list of one of 'binary', 'list', got 'binary'"),
        ("dtype=float64", "bench.sink.dtype"),
        ("row=4", "bench sink: --opt row: no such option (options: rows, tokens, dim, formats"),
    ],
)
def test_bench_opt_errors_name_the_key(monkeypatch, capsys, opt, message):
    calls: list = []
    _fake_sink(monkeypatch, calls)
    assert cli_main(["bench", "sink", "--opt", opt]) == 2
    assert message in capsys.readouterr().err
    assert calls == []


def test_bench_all_skips_missing_dependencies_and_records_failures(monkeypatch, tmp_path):
    def missing(call):
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    def broken(call):
        raise RuntimeError("boom")

    runners = dict(bench_cli.RUNNERS)
    runners["encoder"] = replace(runners["encoder"], run=lambda call: {"ok": True})
    runners["pipeline"] = replace(runners["pipeline"], run=broken)
    runners["preprocess"] = replace(runners["preprocess"], run=missing)
    runners["serve"] = replace(runners["serve"], run=missing)
    runners["plan"] = replace(runners["plan"], run=lambda call: {"planned": True})
    monkeypatch.setattr(bench_cli, "RUNNERS", runners)
    calls: list = []
    _fake_sink(monkeypatch, calls)
    out = tmp_path / "all.json"
    rc = cli_main(["bench", "all", "--tiny", "--opt", "rows=3", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert rc == 1  # one benchmark failed
    assert list(results) == [
        "encoder",
        "pipeline",
        "preprocess",
        "sink",
        "plan",
        "serve",
    ]  # table, ... not in all
    assert results["encoder"] == {"ok": True}
    assert results["pipeline"]["error"] == "RuntimeError: boom"
    assert results["preprocess"] == results["serve"] == {"skipped": "No module named 'ray'"}
    assert results["sink"]["rows"] == 3 and calls[0].rows == 3  # --opt goes to the benchmarks that take it
    assert results["plan"] == {"planned": True}
    # A single benchmark whose dependency is missing is a usage error.
    assert cli_main(["bench", "preprocess", "--tiny"]) == 2


@pytest.mark.parametrize(
    "options",
    [
        EncoderOptions,
        PipelineOptions,
        PreprocessOptions,
        SinkOptions,
        PlanOptions,
        TableOptions,
        ProfileOptions,
        ServeOptions,
        SharedPoolOptions,
    ],
    ids=lambda cls: cls.__name__,
)
def test_every_benchmark_option_has_a_default_and_a_doc(options):
    built = options()  # every field has a default, and the defaults pass the checks
    assert dataclasses.is_dataclass(built) and options.__dataclass_params__.frozen
    docs = field_docs(options)
    for f in dataclasses.fields(options):
        assert docs.get(f.name), f"{options.__name__}.{f.name} has no one-line doc"
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.__setattr__(dataclasses.fields(options)[0].name, None)


def test_timing_json_and_table_helpers(tmp_path):
    timing = time_callable(lambda: sum(range(100)), torch.device("cpu"), warmup=1, repeats=5)
    assert timing.repeats == 5 and 0 < timing.min_s <= timing.median_s <= timing.max_s
    assert timing.method == "perf_counter"
    assert percentiles_ms([0.001 * i for i in range(1, 101)]) == pytest.approx(
        {"p50": 51.0, "p99": 99.0, "mean": 50.5}
    )
    path = write_json(tmp_path / "a" / "b.json", {"x": float("nan"), "y": np.float32(1.5), "z": (1, 2)})
    assert json.loads(path.read_text()) == {"x": None, "y": 1.5, "z": [1, 2]}
    text = format_table([{"a": 1, "b": 1234.5}], [("a", "A", ""), ("b", "B", ",.1f")], title="t")
    assert text.splitlines() == ["t", "A  B      ", "-  -------", "1  1,234.5"]


# -- sink and table benchmarks ----------------------------------------------------------------


def test_bench_sink_writes_and_reads_each_tensor_format(tmp_path):
    out = tmp_path / "sink.json"
    # 3 MB of features: enough that a rate rounded to 0.1 MB/s is not 0 on a loaded machine
    opts = ["--opt", "rows=3", "--opt", "tokens=64", "--opt", "dim=4096", "--opt", "repeats=1"]
    opts += ["--opt", "dtype=float32", "--opt", f"tmpdir={tmp_path}"]
    assert cli_main(["bench", "sink", *opts, "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["sink"]
    assert (result["rows"], result["tokens"], result["dim"], result["dtype"]) == (3, 64, 4096, "float32")
    assert result["shard_mb"] == round(3 * 64 * 4096 * 4 / 1e6, 1) == 3.1
    assert sorted(result["results"]) == ["binary", "list"]
    for figures in result["results"].values():
        assert figures["write_mb_s"] > 0 and figures["read_mb_s"] > 0 and figures["file_mb"] >= 3.1
    assert list(tmp_path.iterdir()) == [out]  # its files are removed


@pytest.mark.slow
def test_bench_table_commits_loads_and_plans_a_resume_in_fresh_processes(tmp_path):
    out = tmp_path / "table.json"
    opts = ["--opt", "sizes=[30, 45]", "--opt", f"workdir={tmp_path / 'w'}"]
    assert cli_main(["bench", "table", "--tiny", *opts, "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["table"]
    assert result["commit_max_units"] == Config().job.commit_max_units and sorted(result["cases"]) == [
        "30",
        "45",
    ]
    for units, case in result["cases"].items():
        commit, snapshot, resume = case["commit"], case["snapshot"], case["resume"]
        assert case["units"] == int(units) and commit["state"] == "complete"
        assert commit["commits"] == 1 and commit["commit_s"] > 0 and commit["finish_s"] > 0
        assert snapshot["files"] == snapshot["keys"] == int(units)  # one data file per unit, every key read
        assert f"{units} of {units} unit(s)" in resume["state"] and 0 < resume["plan_s"] < resume["resume_s"]
        for step in ("commit", "snapshot", "resume"):
            assert case[step][f"{step}_peak_rss_mb"] > 0 and case[step]["process_s"] > 0
        assert case["met"] is True  # below 10⁵ units the targets do not apply
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "config.json",
        "manifests-30",
        "manifests-45",
    ]


# -- pipeline benchmark -----------------------------------------------------------------------


def test_steady_rates_from_commit_times():
    from pipeline.bench.pipeline import steady_rates

    assert steady_rates([(0.0, 8, 100)]) == (None, None)
    images, mb = steady_rates([(10.0, 8, 1_000_000), (11.0, 8, 1_000_000), (12.0, 8, 1_000_000)])
    assert images == pytest.approx(8.0) and mb == pytest.approx(1.0)


@pytest.mark.slow
def test_bench_pipeline_tiny_end_to_end(tmp_path):
    out = tmp_path / "pipeline.json"
    rc = cli_main(
        [
            "bench",
            "pipeline",
            "--tiny",
            "--images",
            "48",
            "--shard-size",
            "16",
            "--batch-size",
            "16",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())["results"]["pipeline"]
    assert result["job"]["ok"] == 48 and result["job"]["errors"] == {}
    assert result["encoder_only_images_per_s"] > 0 and result["job_images_per_s"] > 0
    assert result["job_steady_images_per_s"] > 0 and result["sink_mb_per_s"] > 0


def test_profile_kernel_kinds_by_name():
    from pipeline.bench.profile import kernel_kind

    gemm = [
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64",
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT",
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn",
        "triton_tem_fused_addmm_0",
        "aten::addmm",
    ]
    attention = [
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>",
        "fmha_cutlassF_bf16_aligned",
    ]
    other = [
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>",
        "triton_per_fused_native_layer_norm_0",
    ]
    assert [kernel_kind(n) for n in gemm] == ["gemm"] * len(gemm)
    assert [kernel_kind(n) for n in attention] == ["attention"] * len(attention)
    assert [kernel_kind(n) for n in other] == ["other"] * len(other)


@pytest.mark.slow
def test_bench_plan_measures_dry_runs_in_fresh_processes(tmp_path):
    out = tmp_path / "plan.json"
    opts = [
        "--opt",
        "rows=3000",
        "--opt",
        "manifest_files=3",
        "--opt",
        "tars=40",
        "--opt",
        f"workdir={tmp_path / 'w'}",
    ]
    assert cli_main(["bench", "plan", "--tiny", *opts, "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["plan"]
    manifest, tars = result["cases"]["manifest"], result["cases"]["webdataset"]
    assert (manifest["kind"], manifest["files"], manifest["rows"], manifest["units"]) == (
        "manifest",
        3,
        3000,
        12,
    )
    assert (tars["kind"], tars["files"], tars["rows"], tars["units"]) == ("webdataset", 40, None, 40)
    for case in (manifest, tars):
        assert 0 < case["plan_s"] < case["command_s"]
        assert 0 < case["plan_peak_rss_mb"] <= case["command_peak_rss_mb"]
        assert case["met"] is True  # tiny inputs: far within the targets
    assert sorted(p.name for p in (tmp_path / "w" / "manifests").iterdir()) == [
        f"part-0000{i}.parquet" for i in range(3)
    ]
