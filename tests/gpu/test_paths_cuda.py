"""The product's other device paths on CUDA: the nvJPEG decode route against its documented
tolerance, the offline job's actor path in one process (decode → encode → Parquet shard through
``pipeline.sink``, no Ray), and LLaVA-NeXT's anyres tiles and packed rows against the CPU.

Torch level only: nothing here imports Ray, FastAPI or python-multipart.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.bench.models import bench_resolved, random_modules
from pipeline.config import load_config
from pipeline.encoder import FeatureEncoder, preprocess_spec
from pipeline.images.gpu_decode import NVJPEG_TOLERANCE, BatchedJpegDecoder
from pipeline.images.preprocess import Preprocessor
from pipeline.model.errors import DecodeError
from tests.corpus import real_photos, write_bad_corpus, write_real_photos
from tests.gpu.common import BF16_REL_ERROR, FP32_MAX_ABS, encoder_on, max_abs, rel_error, release, vit_arch


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _nvjpeg_or_skip() -> None:
    """Skip unless torchvision's decode_jpeg runs on this CUDA device."""
    try:
        from torchvision.io import decode_jpeg

        data = torch.frombuffer(bytearray(_jpeg(np.full((16, 16, 3), 128, np.uint8))), dtype=torch.uint8)
        decode_jpeg([data], device="cuda")
    except Exception as exc:
        pytest.skip(f"torchvision's decode_jpeg on cuda is unavailable: {type(exc).__name__}: {exc}")


# -- nvJPEG ------------------------------------------------------------------------------------


def test_nvjpeg_route_within_its_documented_tolerance(cuda, gpu_figures):
    """Baseline JPEGs of real photos through nvJPEG + the device resize vs the exact CPU path (uint8
    pixels, then ViT-L features in float32), within ``NVJPEG_TOLERANCE``; other inputs take the
    CPU route or get the CPU guard's error code."""
    _nvjpeg_or_skip()
    arch = vit_arch()
    spec = preprocess_spec(bench_resolved(arch))
    cpu = Preprocessor(spec)
    decoder = BatchedJpegDecoder(spec, device=cuda)
    assert decoder.use_gpu
    photos = [p for p in real_photos().values() if p.ndim == 3][:6]
    datas = [_jpeg(p) for p in photos]
    png = io.BytesIO()
    Image.fromarray(photos[0]).save(png, format="PNG")
    results = decoder([*datas, png.getvalue(), b"\xff\xd8 not a jpeg"])
    assert [r.route for r in results[: len(datas)]] == ["gpu"] * len(datas)
    assert results[len(datas)].route == "cpu"
    assert isinstance(results[-1], DecodeError)
    means, within, worst = [], [], 0
    gpu_pixels, cpu_pixels = [], []
    for data, result in zip(datas, results, strict=False):
        ref = cpu(data)
        assert (result.width, result.height) == (ref.width, ref.height)
        got = result.pixels.cpu().numpy()
        assert got.shape == ref.pixels.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(np.int16) - ref.pixels.astype(np.int16))
        means.append(float(diff.mean()))
        within.append(float((diff <= NVJPEG_TOLERANCE["levels"]).mean()))
        worst = max(worst, int(diff.max()))
        gpu_pixels.append(result.pixels)
        cpu_pixels.append(torch.from_numpy(ref.pixels))
    np.testing.assert_array_equal(results[len(datas)].pixels.cpu().numpy(), cpu(png.getvalue()).pixels)
    master = random_modules(arch)
    encoder = encoder_on(arch, master, cuda, torch.float32)
    features_gpu = encoder.encode_core(torch.stack(gpu_pixels))["projected"]
    features_cpu = encoder.encode_core(torch.stack(cpu_pixels))["projected"]
    features_rel = rel_error(features_gpu, features_cpu)
    release(encoder)
    gpu_figures["nvjpeg"] = {
        "images": len(datas),
        "mean_abs_levels": float(np.mean(means)),
        "max_mean_abs_levels": max(means),
        f"fraction_within_{NVJPEG_TOLERANCE['levels']}_levels": min(within),
        "max_abs_levels": worst,
        "vit_l_fp32_features_rel_error": features_rel,
    }
    assert max(means) <= NVJPEG_TOLERANCE["mean_levels"], gpu_figures["nvjpeg"]
    assert min(within) >= NVJPEG_TOLERANCE["fraction_within"], gpu_figures["nvjpeg"]
    assert features_rel <= NVJPEG_TOLERANCE["features_rel_error"], gpu_figures["nvjpeg"]


def test_encoder_with_decode_nvjpeg_on_cuda(cuda):
    """``decode.nvjpeg: true`` on a CUDA encoder: prepare_many decodes baseline JPEGs on the device,
    encode_prepared takes their device pixels; the fingerprint names the route."""
    _nvjpeg_or_skip()
    from dataclasses import replace

    from pipeline.bench.arch import tiny_arch
    from pipeline.config import Config

    arch = tiny_arch()
    base = Config()
    config = replace(base, decode=replace(base.decode, nvjpeg=True))
    master = random_modules(arch)
    encoder = encoder_on(arch, master, cuda, torch.float32, config=config, output_dtype="float32")
    exact = encoder_on(arch, master, cuda, torch.float32, output_dtype="float32")
    assert encoder.info()["decode_route"] == "nvjpeg"
    assert encoder.fingerprint != exact.fingerprint
    photos = [p for p in real_photos().values() if p.ndim == 3][:3]
    datas = [_jpeg(p) for p in photos] + [b"not an image"]
    prepared = encoder.prepare_many(datas)
    assert isinstance(prepared[-1], DecodeError) and str(prepared[-1].code) == "not_an_image"
    good = [p for p in prepared if not isinstance(p, DecodeError)]
    assert all(isinstance(p.pixels, torch.Tensor) and p.pixels.device.type == "cuda" for p in good)
    got = encoder.encode_prepared(good).projected
    want = exact.encode_prepared(exact.prepare_many(datas[:3])).projected
    assert got.shape == want.shape
    assert rel_error(got, want) <= NVJPEG_TOLERANCE["features_rel_error"]
    release(encoder, exact)


# -- the job's actor path, in process ----------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """Real photos and the bad-image corpus, with a manifest naming every file (the listing of a
    folder only picks image extensions). Returns (manifest, {name: expected error code or None})."""
    folder = tmp_path_factory.mktemp("gpu-corpus")
    expected: dict[str, str | None] = {p.name: None for p in write_real_photos(folder, n=6)}
    expected.update(write_bad_corpus(folder))
    manifest = folder.parent / f"{folder.name}.csv"
    manifest.write_text("\n".join(["image_id,uri", *(f"{n},{folder / n}" for n in sorted(expected))]) + "\n")
    return manifest, expected


@pytest.mark.parametrize(
    ("dtype", "nvjpeg"), [("float32", False), ("bfloat16", False), ("bfloat16", True)], ids=str
)
def test_job_actor_path_in_process_on_cuda(tiny_models, corpus, tmp_path, dtype, nvjpeg):
    """decode_unit → EncodeShardActor (encode on CUDA, commit each output file) for every unit of
    the plan, without Ray: one row per input, each id once, the decode guard's codes,
    and ok rows equal to the CPU float32 encoder (float32: ≤ 1e-4; bfloat16: relative ≤ 2e-2)."""
    if nvjpeg:
        _nvjpeg_or_skip()
    from pipeline.encoder import describe_encoder
    from pipeline.model import resolve_model
    from pipeline.offline import make_plan, new_table_run, planned_units
    from pipeline.offline.actors import EncodeShardActor, shard_target
    from pipeline.offline.decode import decode_unit, read_options, unit_batch
    from pipeline.records import ShardSummary, rows_of_batch
    from pipeline.table import read_features

    manifest, expected = corpus
    checkpoint = str(tiny_models["llava"])
    config = load_config(
        None,
        {
            "model": {"checkpoint": checkpoint, "device": "cuda", "dtype": dtype},
            "encoder": {"output_dtype": "float32"},
            "decode": {"nvjpeg": nvjpeg},
            "job": {"shard_size": 4},
        },
    )
    resolved = resolve_model(config.model)
    description = describe_encoder(config, resolved)
    out = tmp_path / "out"
    plan = make_plan(config, str(manifest))
    run = new_table_run(config, plan, str(out), resolved=resolved)
    actor = EncodeShardActor(config, resolved, shard_target(config, run, description.fingerprint))
    assert actor.writer.encoder.device.type == "cuda"
    read = read_options(config)
    units = planned_units(plan)
    committer = run.committer({u.index: u for u in units})
    for unit, planned in zip(plan.units, units, strict=True):
        batch = unit_batch([unit], [planned.key])
        pieces = decode_unit(batch, config=config, resolved=resolved, read=read, shard_size=4)
        rows = 0
        for piece in pieces:
            (done,) = [ShardSummary.from_row(r) for r in rows_of_batch(actor(piece))]
            done.commit_to(committer)
            rows += done.rows
        assert rows == unit.rows
    committer.close()
    run.finish(units, max_error_fraction=1.0)
    run.close()
    actor.writer.encoder.close()

    table = read_features(str(out), status=None).table
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)
    codes = dict(zip(ids, table.column("error_code").to_pylist(), strict=True))
    ok = read_features(str(out))
    assert ok.identity.fingerprint == description.fingerprint
    cpu = FeatureEncoder(
        load_config(None, {"model": {"checkpoint": checkpoint, "device": "cpu", "dtype": "float32"}})
    )
    for row, uri in enumerate(ok.table.column("uri").to_pylist()):
        ref = cpu.encode_pixels(cpu.encode_pre(Path(uri).read_bytes()).pixels[None]).projected[0]
        if dtype == "float32" and not nvjpeg:
            assert max_abs(ok.features[row], ref) <= FP32_MAX_ABS, uri
        else:
            limit = NVJPEG_TOLERANCE["features_rel_error"] if nvjpeg else BF16_REL_ERROR
            assert rel_error(ok.features[row], ref) <= limit, uri
    # Every input's outcome is the decode guard's, on both decode routes (last: the features'
    # checks above say more when a route decodes an input the guard refuses).
    wrong = {name: (codes[name], code) for name, code in expected.items() if codes[name] != code}
    assert not wrong, f"(got, expected) error codes: {wrong}"


# -- LLaVA-NeXT --------------------------------------------------------------------------------


def _anyres_images() -> list[bytes]:
    """Photos of several aspect ratios (portrait, landscape, wide, square, small)."""
    rng = np.random.default_rng(0)
    out = []
    for width, height in ((64, 48), (48, 96), (150, 50), (80, 80), (30, 40)):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 100)], axis=-1)
        arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _next_encoder(checkpoint: Path, device: str, dtype: str, output: str) -> FeatureEncoder:
    return FeatureEncoder(
        load_config(
            None,
            {
                "model": {"checkpoint": str(checkpoint), "device": device, "dtype": dtype},
                "encoder": {"anyres_output": output, "output_dtype": "float32", "pooled": True},
            },
        )
    )


@pytest.mark.parametrize("output", ["tiles", "packed"])
def test_llava_next_anyres_on_cuda_matches_cpu(tiny_models, gpu_figures, output):
    """The tiny llava-next-hf checkpoint: CUDA float32 rows equal the CPU's (≤ 1e-4), bfloat16 rows
    within 2e-2 relative error; same shapes and tile grids."""
    checkpoint = tiny_models["llava-next-hf"]
    datas = _anyres_images()
    cpu = _next_encoder(checkpoint, "cpu", "float32", output)
    ref = cpu.encode_prepared([cpu.encode_pre(d) for d in datas])
    figures: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        gpu = _next_encoder(checkpoint, "cuda", dtype, output)
        assert gpu.device.type == "cuda"
        got = gpu.encode_prepared([gpu.encode_pre(d) for d in datas])
        assert [(g.rows, g.cols) for g in got.grids] == [(g.rows, g.cols) for g in ref.grids]
        worst_abs, worst_rel = 0.0, 0.0
        for i in range(len(datas)):
            a, b = got.projected[i], ref.projected[i]
            assert a.shape == b.shape, (i, a.shape, b.shape)
            worst_abs, worst_rel = max(worst_abs, max_abs(a, b)), max(worst_rel, rel_error(a, b))
        figures[dtype] = {"max_abs": worst_abs, "rel_error": worst_rel}
        if dtype == "float32":
            assert worst_abs <= FP32_MAX_ABS, figures
            np.testing.assert_allclose(got.pooled, ref.pooled, atol=FP32_MAX_ABS)
        else:
            assert worst_rel <= BF16_REL_ERROR, figures
        release(gpu)
    gpu_figures[f"llava_next_{output}"] = figures
