"""The benchmark harness and the encoder's fast path, on CPU.

- ``bench encoder --tiny`` through ``pipeline.cli.main`` writes sane JSON;
- the FLOP count of ViT-L/14-336 layer -2 + mlp2x_gelu is ANCHORS.md's 389.5 GFLOP (±1 %);
- load-time transforms (fused QKV, folded quick_gelu) match the unfused tower in float32;
- batch buckets: planning, padding and slicing (with compile replaced by eager), and a real
  ``torch.compile`` run (marked slow);
- GPU JPEG decode falls back to the exact CPU path without torchvision/CUDA, and its device
  resize stays within the documented tolerance of the CPU path.
"""

from __future__ import annotations

import copy
import io
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from pipeline.bench import cli as bench_cli
from pipeline.bench.common import (
    KNOWN_TOWERS,
    bench_arch,
    encoder_flops,
    photo_images,
    print_table,
    time_callable,
    tiny_arch,
    write_json,
)
from pipeline.cli import main as cli_main
from pipeline.config import Config, load_config
from pipeline.model import CLIPVisionTower
from pipeline.model import fast as fastpath
from pipeline.model.errors import DecodeError
from pipeline.model.tiny import TINY_VISION
from pipeline.preprocess import Preprocessor, PreprocessSpec

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
    printed = capsys.readouterr().out
    assert "ours img/s" in printed and "×seed" in printed


def test_bench_needs_config_or_tiny():
    assert cli_main(["bench", "encoder"]) == 2


def _fake_bench_module(monkeypatch, calls):
    module = types.ModuleType("fake_bench_sink")

    def bench_sink(
        rows: int = 64, tokens: int = 576, dim: int = 4096, *, repeats: int = 3, compression: str = "none"
    ):
        calls.append(
            {"rows": rows, "tokens": tokens, "dim": dim, "repeats": repeats, "compression": compression}
        )
        return {"rows": rows, "results": {"binary": {"write_mb_s": 123.0}}}

    module.bench_sink = bench_sink
    monkeypatch.setitem(sys.modules, "fake_bench_sink", module)
    monkeypatch.setitem(bench_cli._EXTERNAL, "sink", ("fake_bench_sink", "bench_sink"))


def test_bench_dispatches_to_external_modules_with_supported_options(monkeypatch, tmp_path):
    calls: list[dict] = []
    _fake_bench_module(monkeypatch, calls)
    out = tmp_path / "sink.json"
    rc = cli_main(
        [
            "bench",
            "sink",
            "--tiny",
            "--repeats",
            "2",
            "--opt",
            "rows=4",
            "--opt",
            "compression=zstd",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    assert calls == [{"rows": 4, "tokens": 576, "dim": 4096, "repeats": 2, "compression": "zstd"}]
    assert json.loads(out.read_text())["results"]["sink"]["rows"] == 4


def test_bench_all_skips_missing_modules_and_records_failures(monkeypatch, tmp_path):
    monkeypatch.setitem(bench_cli._EXTERNAL, "preprocess", ("no_such_module_for_bench", "bench_preprocess"))
    monkeypatch.setitem(bench_cli._EXTERNAL, "serve", ("no_such_module_for_bench", "bench_serve"))
    calls: list[dict] = []
    _fake_bench_module(monkeypatch, calls)
    monkeypatch.setitem(bench_cli.RUNNERS, "encoder", lambda args, config, workdir: {"ok": True})

    def broken(args, config, workdir):
        raise RuntimeError("boom")

    monkeypatch.setitem(bench_cli.RUNNERS, "pipeline", broken)
    out = tmp_path / "all.json"
    rc = cli_main(["bench", "all", "--tiny", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert rc == 1  # one benchmark failed
    assert results["encoder"] == {"ok": True}
    assert results["pipeline"]["error"] == "RuntimeError: boom"
    assert "skipped" in results["preprocess"] and "skipped" in results["serve"]
    assert results["sink"]["rows"] == 64
    # A single missing benchmark is a usage error.
    assert cli_main(["bench", "preprocess", "--tiny"]) == 2


def test_call_supported_passes_only_named_parameters():
    def fn(config, images=1, *, repeats=3):
        return (config, images, repeats)

    got = bench_cli.call_supported(fn, {"images": 5, "repeats": None, "dtype": "x"}, {}, "cfg")
    assert got == ("cfg", 5, 3)


def test_timing_json_and_table_helpers(tmp_path, capsys):
    timing = time_callable(lambda: sum(range(100)), torch.device("cpu"), warmup=1, repeats=5)
    assert timing.repeats == 5 and 0 < timing.min_s <= timing.median_s <= timing.max_s
    path = write_json(tmp_path / "a" / "b.json", {"x": float("nan"), "y": np.float32(1.5), "z": (1, 2)})
    assert json.loads(path.read_text()) == {"x": None, "y": 1.5, "z": [1, 2]}
    text = print_table([{"a": 1, "b": 1234.5}], [("a", "A", ""), ("b", "B", ",.1f")], title="t")
    assert "1,234.5" in text and capsys.readouterr().out.startswith("t\n")


# -- fast-path transforms ---------------------------------------------------------------------


def _tower(vision: dict, seed: int = 0, attn: str = "sdpa") -> CLIPVisionTower:
    torch.manual_seed(seed)
    model = CLIPVisionModel._from_config(
        CLIPVisionConfig(**vision), attn_implementation=attn, dtype=torch.float32
    )
    return CLIPVisionTower.from_model(model.eval(), {"mm_vision_select_layer": -2})


VIT_L_NARROW = {**VIT_L, "num_hidden_layers": 3, "image_size": 112}  # real widths, few layers/tokens


@pytest.mark.parametrize("vision", [TINY_VISION, VIT_L_NARROW], ids=["tiny", "vit-l-width"])
@pytest.mark.parametrize(
    ("qkv", "gelu"), [(True, False), (False, True), (True, True)], ids=["qkv", "gelu", "both"]
)
def test_fast_transforms_match_unfused_tower_float32(vision, qkv, gelu):
    ref = _tower(vision)
    fast = copy.deepcopy(ref)
    done = fastpath.apply_fast_path(fast, qkv=qkv, quick_gelu=gelu)
    layers = vision["num_hidden_layers"]
    assert done == {**({"fuse_qkv": layers} if qkv else {}), **({"fold_quick_gelu": layers} if gelu else {})}
    x = torch.randn(
        2, 3, vision["image_size"], vision["image_size"], generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        want, got = ref.encode(x), fast.encode(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5
    # Applying again changes nothing.
    assert set(fastpath.apply_fast_path(fast, qkv=qkv, quick_gelu=gelu).values()) == {0}


def test_fused_qkv_module_types_and_eager_tower_left_alone():
    tower = _tower(TINY_VISION)
    fastpath.fuse_qkv(tower)
    attn = tower._core.encoder.layers[0].self_attn
    assert isinstance(attn, fastpath.FusedQKVAttention)
    assert attn.qkv.weight.shape == (3 * 32, 32)
    eager = _tower(TINY_VISION, attn="eager")
    assert fastpath.fuse_qkv(eager) == 0
    folded = fastpath.fold_quick_gelu(tower)
    assert folded == 3 and isinstance(tower._core.encoder.layers[0].mlp, fastpath.SiLUFoldedMLP)


def test_fast_transforms_bfloat16_error_unchanged():
    """In bf16 (after loading in bf16, as the product does) the transforms add no visible error."""
    ref32 = _tower(VIT_L_NARROW)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    plain = copy.deepcopy(ref32).to(torch.bfloat16)
    fast = copy.deepcopy(plain)
    fastpath.apply_fast_path(fast, qkv=True, quick_gelu=True)
    with torch.inference_mode():
        want = ref32.encode(x)
        err_plain = ((plain.encode(x.bfloat16()).float() - want).norm() / want.norm()).item()
        err_fast = ((fast.encode(x.bfloat16()).float() - want).norm() / want.norm()).item()
    assert err_fast < 2e-2
    assert err_fast <= err_plain * 1.1


# -- buckets, padding, encoder paths ----------------------------------------------------------


def test_bucket_plan_and_defaults():
    assert fastpath.bucket_plan(0, (4, 8)) == []
    assert fastpath.bucket_plan(8, (4, 8)) == [8]
    assert fastpath.bucket_plan(300, (32, 128, 256)) == [256, 32, 32]
    assert fastpath.bucket_plan(130, (32, 128, 256)) == [128, 32]
    assert fastpath.bucket_plan(3, (4, 8)) == [4]
    assert fastpath.bucket_plan(21, (4, 8)) == [8, 8, 8]  # same work as 8+8+4+4, fewer calls
    for n in range(1, 70):
        plan = fastpath.bucket_plan(n, (2, 8, 32))
        assert 0 <= sum(plan) - n < 2  # the smallest bucket is 2: at most one padded row
        assert sum(plan[:-1]) < n  # every piece holds at least one image
    assert fastpath.default_buckets((256,), 2) == (32, 128, 256)
    assert fastpath.default_buckets((256, 32), 2) == (4, 16, 32, 128, 256)
    with pytest.raises(ValueError):
        fastpath.validate_buckets((0, 4))


def test_run_bucketed_pads_and_slices():
    seen = []

    def fn(x):
        seen.append(x.shape[0])
        return {"y": x * 2, "s": x.sum(dim=1)}

    x = torch.arange(21 * 3, dtype=torch.float32).view(21, 3)
    out = fastpath.run_bucketed(fn, x, (4, 8))
    assert seen == fastpath.bucket_plan(21, (4, 8)) and all(s in (4, 8) for s in seen)
    torch.testing.assert_close(out["y"], x * 2)
    torch.testing.assert_close(out["s"], x.sum(dim=1))
    assert fastpath.pad_batch(x[:3], 4)[3].abs().sum() == 0


def test_overlapped_map_cpu_is_an_ordered_loop():
    chunks = [torch.full((2, 3), float(i)) for i in range(4)]
    out = list(fastpath.overlapped_map(chunks, lambda b: {"v": b + 1}, torch.device("cpu")))
    assert [o["v"][0, 0].item() for o in out] == [1.0, 2.0, 3.0, 4.0]


def _tiny_encoder(variant: str, **model_over):
    from pipeline.bench.common import random_modules
    from pipeline.bench.encoder import _make_encoder

    arch = tiny_arch()
    cfg = Config()
    cfg = replace(cfg, job=replace(cfg.job, features="both", pooled=True))
    enc = _make_encoder(
        cfg, arch, random_modules(arch), torch.device("cpu"), torch.float32, variant, (4, 8), None
    )
    if model_over:
        enc.config = replace(enc.config, model=replace(enc.config.model, **model_over))
    enc.config = replace(enc.config, job=replace(enc.config.job, features="both", pooled=True))
    return enc


def test_encoder_fast_path_matches_plain_and_keeps_outputs():
    pixels = np.random.default_rng(0).integers(0, 256, (11, 3, 56, 56), dtype=np.uint8)
    plain, fast = _tiny_encoder("plain"), _tiny_encoder("fast")
    a, b = plain.encode_pixels(pixels, batch_size=4), fast.encode_pixels(pixels, batch_size=4)
    assert fast._fast_path().transforms == {"fuse_qkv": 3, "fold_quick_gelu": 3}
    for name, shape in (("projected", (11, 16, 64)), ("tower", (11, 16, 32)), ("pooled", (11, 64))):
        x, y = getattr(a, name), getattr(b, name)
        assert isinstance(y, np.ndarray) and y.shape == shape and y.flags.c_contiguous
        np.testing.assert_allclose(x, y, atol=1e-5)
    # encode_core + encode_post give the same as encode_pixels.
    post = fast.encode_post(fast.encode_core(pixels[:4]))
    np.testing.assert_allclose(post.projected, b.projected[:4], atol=1e-6)
    empty = fast.encode_pixels(np.zeros((0, 3, 56, 56), np.uint8))
    assert empty.projected.shape == (0, 16, 64) and empty.projected.dtype == b.projected.dtype
    assert empty.tower.shape == (0, 16, 32) and empty.tower.dtype == b.tower.dtype
    assert empty.pooled.shape == (0, 64) and empty.pooled.dtype == np.float32


def test_encoder_bucket_padding_with_compile_stubbed(monkeypatch):
    """The compiled path's buckets/padding/slicing, with torch.compile replaced by the eager function."""
    monkeypatch.setattr(fastpath, "compile_static", lambda fn, mode=None: fn)
    pixels = np.random.default_rng(1).integers(0, 256, (21, 3, 56, 56), dtype=np.uint8)
    ref = _tiny_encoder("fast").encode_pixels(pixels, batch_size=8)
    enc = _tiny_encoder("compiled")
    seen = []
    run_model = enc._run_model

    def spy(values, project, keep_tower):
        seen.append(values.shape[0])
        return run_model(values, project, keep_tower)

    monkeypatch.setattr(enc, "_run_model", spy)
    assert enc.warmup() >= 0
    assert seen == [4, 8]  # one pass per bucket at warm-up
    seen.clear()
    got = enc.encode_pixels(pixels, batch_size=8)
    assert seen == [8, 8, 8]  # 8 + 8 + 5 (padded to 8)
    np.testing.assert_allclose(got.projected, ref.projected, atol=1e-5)
    np.testing.assert_allclose(got.pooled, ref.pooled, atol=1e-5)
    seen.clear()
    enc.encode_core(pixels[:3])
    assert seen == [4]


def test_encoder_rejects_bad_fast_path_settings():
    enc = _tiny_encoder("fast", overlap_chunks=0)
    from pipeline.model.errors import ConfigError

    with pytest.raises(ConfigError, match="overlap_chunks"):
        enc.warmup()
    enc = _tiny_encoder("fast", compile_mode="fastest")
    with pytest.raises(ConfigError, match="compile_mode"):
        enc.warmup()


@pytest.mark.slow
def test_torch_compile_with_buckets_on_cpu():
    pixels = np.random.default_rng(2).integers(0, 256, (11, 3, 56, 56), dtype=np.uint8)
    ref = _tiny_encoder("fast").encode_pixels(pixels, batch_size=8)
    enc = _tiny_encoder("compiled")
    enc.warmup()
    got = enc.encode_pixels(pixels, batch_size=8)
    np.testing.assert_allclose(got.projected, ref.projected, atol=1e-4)


# -- GPU JPEG decode: fallback and tolerance --------------------------------------------------


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _pil_decode_fn(fail_on: set[int] | None = None):
    """A stand-in for torchvision's batched decode_jpeg: PIL on the CPU; refuses inputs by length."""
    fail_on = fail_on or set()

    def decode(datas, device):
        out = []
        for t in datas:
            if len(t) in fail_on:
                raise RuntimeError("nvjpeg refused this one")
            img = Image.open(io.BytesIO(t.numpy().tobytes())).convert("RGB")
            out.append(torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()).to(device))
        return out

    return decode


def test_gpu_decode_falls_back_to_the_exact_cpu_path():
    from pipeline.gpu_decode import BatchedJpegDecoder, gpu_decode_available, load_decode_jpeg

    assert not gpu_decode_available("cpu")
    try:
        import torchvision  # noqa: F401
    except Exception:
        assert load_decode_jpeg() is None
    spec = PreprocessSpec(size=56, crop_height=56, crop_width=56)
    decoder = BatchedJpegDecoder(spec, device="cpu", use_gpu=True)  # asked for, unavailable: CPU route
    assert not decoder.use_gpu
    photo = photo_images(1, 48, 64)[0]
    png = io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")
    datas = [_jpeg(photo), png.getvalue(), b"not an image", _jpeg(photo)[:200]]
    results = decoder(datas, names=["a.jpg", "b.png", "c", "d.jpg"])
    pre = Preprocessor(spec)
    for data, result in zip(datas[:2], results[:2], strict=True):
        assert result.route == "cpu"
        np.testing.assert_array_equal(result.pixels.numpy(), pre(data).pixels)
    for data, result in zip(datas[2:], results[2:], strict=True):
        assert isinstance(result, DecodeError)
        with pytest.raises(DecodeError) as expected:
            pre(data)
        assert result.code == expected.value.code
    batch, ok = BatchedJpegDecoder.stack(results)
    assert ok == [0, 1] and tuple(batch.shape) == (2, 3, 56, 56)


def test_gpu_route_logic_with_a_stand_in_decoder(monkeypatch):
    # pipeline.decode writes the guard's limit into PIL's process-wide bomb check: restore it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    from pipeline.config import DecodeConfig
    from pipeline.gpu_decode import BatchedJpegDecoder

    spec = PreprocessSpec()  # 336 px, pad
    photos = photo_images(3, 120, 160, seed=4)
    good = [_jpeg(p) for p in photos]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: must take the CPU route (nvJPEG ignores EXIF)
    rotated = _jpeg(photos[0], exif=exif.tobytes())
    cmyk = io.BytesIO()
    Image.fromarray(photos[1]).convert("CMYK").save(cmyk, format="JPEG")
    refused = good[2]
    datas = [good[0], good[1], rotated, cmyk.getvalue(), refused, b"\xff\xd8garbage"]
    decoder = BatchedJpegDecoder(spec, device="cpu", decode_fn=_pil_decode_fn({len(refused)}))
    assert decoder.use_gpu
    results = decoder(datas)
    assert [getattr(r, "route", None) for r in results[:5]] == ["gpu", "gpu", "cpu", "cpu", "cpu"]
    assert isinstance(results[5], DecodeError)
    assert decoder.stats == {"gpu": 2, "cpu": 3, "gpu_failed": 1}
    pre = Preprocessor(spec)
    for data, result in zip(datas[:5], results[:5], strict=True):
        ref = pre(data)
        assert (result.width, result.height) == (ref.width, ref.height)
        diff = np.abs(result.pixels.numpy().astype(int) - ref.pixels.astype(int))
        if result.route == "cpu":
            assert diff.max() == 0
        else:
            assert diff.max() <= 12 and diff.mean() < 0.5
    # Guard limits apply on the GPU route too: too many pixels → the CPU guard's error.
    small = BatchedJpegDecoder(
        spec, DecodeConfig(max_image_pixels=100), device="cpu", decode_fn=_pil_decode_fn()
    )
    result = small([good[0]])[0]
    assert isinstance(result, DecodeError) and str(result.code) == "too_large"


@pytest.mark.parametrize("aspect", ["pad", "crop", "square"])
def test_device_resize_within_tolerance_of_pil(aspect):
    from pipeline.gpu_decode import prepare_on_device

    spec = PreprocessSpec(aspect_ratio=aspect)
    pre = Preprocessor(spec)
    images = (
        photo_images(4, 480, 640, seed=7)
        + photo_images(2, 400, 300, seed=8)
        + photo_images(1, 200, 150, seed=9)
    )
    means = []
    for arr in images:
        ref = pre.pixels(Image.fromarray(arr)).astype(int)
        got = prepare_on_device(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), spec).numpy()
        assert got.shape == ref.shape
        diff = np.abs(got.astype(int) - ref)
        # PIL rounds (and clips) to uint8 between its two passes, torch does not: rare differences
        # of several levels at high-contrast edges, mostly when upscaling; ≤ 1 level elsewhere.
        assert diff.max() <= 12
        assert (diff > 2).mean() < 1e-3
        means.append(diff.mean())
    assert float(np.mean(means)) < 0.3


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
