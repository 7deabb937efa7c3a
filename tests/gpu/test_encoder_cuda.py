"""The encoder on CUDA against the CPU float32 reference: the real ViT-L/14-336 (random weights) in
float32 and bfloat16 with every load-time transform on and off; every compile mode (CUDA-graph
replays return independent outputs); ``overlapped_map`` against the plain loop; the returned
dtypes; peak device memory per batch size (recorded for ``scripts/gpu-check``).

Torch level only: nothing here imports Ray, FastAPI or python-multipart.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.bench.arch import tiny_arch
from pipeline.bench.models import random_modules
from pipeline.model.constants import CUDAGRAPH_COMPILE_MODES
from pipeline.model.fast import overlapped_map
from tests.gpu.common import (
    BF16_REL_ERROR,
    FP32_MAX_ABS,
    encoder_on,
    max_abs,
    photo_pixels,
    rel_error,
    release,
    vit_arch,
    vit_config,
)

TRANSFORMS = [(False, False), (True, False), (False, True), (True, True)]
"""(model.fuse_qkv, model.fold_quick_gelu)."""
MEMORY_BATCH_SIZES = (32, 64, 128, 256, 512)
GIB = 2**30


@pytest.fixture(scope="module")
def vit() -> dict[str, Any]:
    """ViT-L/14-336 + mlp2x_gelu 1024→4096 (random weights), 4 photo-like images and the CPU float32
    reference (transforms off: LLaVA's arithmetic) of both feature kinds."""
    arch = vit_arch()
    master = random_modules(arch)
    pixels = photo_pixels(4, arch)
    reference = encoder_on(arch, master, "cpu", torch.float32, variant="plain", features="both")
    ref = {k: v.clone() for k, v in reference.encode_core(pixels).items()}
    release(reference)
    return {"arch": arch, "master": master, "pixels": pixels, "ref": ref}


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    arch = tiny_arch()
    return {"arch": arch, "master": random_modules(arch)}


# -- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("fuse_qkv", "fold_quick_gelu"), TRANSFORMS, ids=lambda v: "on" if v else "off")
def test_vit_l_on_cuda_matches_the_cpu_float32_reference(
    vit, cuda, gpu_figures, dtype, fuse_qkv, fold_quick_gelu
):
    compute = getattr(torch, dtype)
    encoder = encoder_on(
        vit["arch"],
        vit["master"],
        cuda,
        compute,
        features="both",
        fuse_qkv=fuse_qkv,
        fold_quick_gelu=fold_quick_gelu,
    )
    applied = {name for name, layers in encoder.fast.transforms.items() if layers}
    assert applied == {n for n, on in (("fuse_qkv", fuse_qkv), ("fold_quick_gelu", fold_quick_gelu)) if on}
    out = encoder.encode_core(vit["pixels"])
    name = f"vit_l_{dtype}_qkv_{'on' if fuse_qkv else 'off'}_gelu_{'on' if fold_quick_gelu else 'off'}"
    for kind in ("projected", "tower"):
        got, ref = out[kind], vit["ref"][kind]
        assert got.device.type == "cuda" and got.dtype == compute and got.shape == ref.shape
        diff, rel = max_abs(got, ref), rel_error(got, ref)
        gpu_figures[f"{name}_{kind}_max_abs"] = diff
        gpu_figures[f"{name}_{kind}_rel_error"] = rel
        if dtype == "float32":
            assert diff <= FP32_MAX_ABS, (kind, diff)
        else:
            assert rel <= BF16_REL_ERROR, (kind, rel)
    release(encoder)


def test_returned_dtypes_on_cuda(tiny, cuda):
    """float16 / float32 / bfloat16 (as its uint16 bit pattern) on the host, from bfloat16 compute."""
    pixels = photo_pixels(5, tiny["arch"])
    for output in ("float16", "float32", "bfloat16"):
        encoder = encoder_on(
            tiny["arch"],
            tiny["master"],
            cuda,
            torch.bfloat16,
            features="both",
            pooled=True,
            output_dtype=output,
        )
        core = encoder.encode_core(pixels)
        got = encoder.encode_pixels(pixels.numpy())
        assert got.dtype == output
        for kind in ("projected", "tower"):
            want = core[kind].to(getattr(torch, output)).cpu()
            want = want.view(torch.int16).numpy().view(np.uint16) if output == "bfloat16" else want.numpy()
            values = getattr(got, kind)
            assert isinstance(values, np.ndarray) and values.dtype == want.dtype
            np.testing.assert_array_equal(values, want)
        pooled = core["projected"].float().mean(dim=1).cpu().numpy()
        np.testing.assert_allclose(got.pooled, pooled, rtol=1e-6, atol=1e-6)
        release(encoder)


# -- compile modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_compile_modes_match_eager_and_keep_earlier_outputs(tiny, cuda, gpu_figures, mode):
    """Every compile mode on CUDA (float32, one static bucket of 8): the features of eager and of the
    CPU reference; the CUDA-graph modes' outputs of one call stay intact after the next replay on
    other inputs (they are cloned out of the graph's memory pool), also through encode_pixels."""
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip(
            "torch.compile on CUDA runs Triton, which builds its launcher with gcc, clang or $CC: none found"
        )
    arch, master = tiny["arch"], tiny["master"]
    pixels = photo_pixels(21, arch, seed=3)
    reference = encoder_on(arch, master, "cpu", torch.float32, variant="plain", features="both")
    ref = reference.encode_core(pixels)
    eager = encoder_on(arch, master, cuda, torch.float32, features="both", output_dtype="float32")
    eager_host = eager.encode_pixels(pixels.numpy(), batch_size=8)
    compiled = encoder_on(
        arch,
        master,
        cuda,
        torch.float32,
        variant="compiled",
        batch_sizes=(8,),
        compile_mode=mode,
        features="both",
        output_dtype="float32",
    )
    assert compiled.fast.compiled is not None and compiled.fast.buckets == (8,)
    assert compiled.fast.cudagraphs == (mode in CUDAGRAPH_COMPILE_MODES)
    compiled.warmup()
    for _ in range(2):  # past CUDA-graph trees' warm-up and recording runs: the next calls replay
        compiled.encode_core(pixels[8:16])

    first = compiled.encode_core(pixels[:8])
    kept = {k: v.clone() for k, v in first.items()}
    second = compiled.encode_core(pixels[8:16])  # a replay on other inputs
    third = compiled.encode_core(pixels[16:])  # 5 images, padded to the bucket
    torch.cuda.synchronize()
    for kind in ("projected", "tower"):
        assert torch.equal(first[kind], kept[kind]), f"{mode}: call 1's {kind} changed after call 2"
        assert not torch.equal(first[kind], second[kind])
        got = torch.cat([first[kind], second[kind], third[kind]]).cpu()
        assert third[kind].shape[0] == 5
        diff = max_abs(got, ref[kind])
        gpu_figures[f"tiny_compile_{mode}_{kind}_max_abs"] = diff
        assert diff <= FP32_MAX_ABS, (mode, kind, diff)

    host = compiled.encode_pixels(pixels.numpy(), batch_size=8)  # overlapped_map + clones
    for kind in ("projected", "tower"):
        assert max_abs(getattr(host, kind), getattr(eager_host, kind)) <= FP32_MAX_ABS
        assert max_abs(getattr(host, kind), ref[kind]) <= FP32_MAX_ABS
    release(compiled, eager, reference)


# -- copy / compute overlap --------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_overlapped_map_equals_the_plain_loop(cuda, depth):
    """Several chunks of odd sizes, pinned, not, and on the device: the same results as compute()
    one by one, and still the same when compared after every later chunk ran (no buffer reused
    while in use)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=gen).to(cuda)
    sizes = [8, 5, 8, 3, 1, 8, 7]
    chunks = [torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen) for n in sizes]
    chunks[2] = chunks[2].pin_memory()
    chunks[4] = chunks[4].to(cuda)  # already on the device: used where it is

    def compute(x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = x.float().reshape(x.shape[0], -1, 48) / 255
        return {"y": torch.relu(values @ weight).half(), "mean": values.mean(dim=(1, 2))}

    expected = [{k: v.cpu() for k, v in compute(c.to(cuda)).items()} for c in chunks]
    got = list(overlapped_map(iter(chunks), compute, cuda, depth=depth))
    torch.cuda.synchronize()
    assert len(got) == len(chunks)
    for want, out in zip(expected, got, strict=True):
        for key in want:
            assert out[key].device.type == "cpu" and out[key].is_pinned()
            assert torch.equal(out[key], want[key]), key


def test_encode_pixels_equals_the_plain_loop_on_cuda(tiny, cuda):
    """encode_pixels (overlapped_map: pinned uploads, three streams) = encode_core + encode_post per
    batch, for several batches with a short tail, and for one batch split for overlap."""
    arch = tiny["arch"]
    encoder = encoder_on(
        arch, tiny["master"], cuda, torch.float32, features="both", pooled=True, output_dtype="float32"
    )
    pixels = photo_pixels(29, arch, seed=5).numpy()
    got = encoder.encode_pixels(pixels, batch_size=8)
    plain = [encoder.encode_post(encoder.encode_core(pixels[i : i + 8])) for i in range(0, 29, 8)]
    for kind in ("projected", "tower", "pooled"):
        want = np.concatenate([getattr(p, kind) for p in plain])
        assert getattr(got, kind).shape == want.shape
        # Same kernels on the same shapes: equal up to the last bit of a float32 sum.
        np.testing.assert_allclose(getattr(got, kind), want, rtol=1e-6, atol=1e-6)
    # Pixels already on the device (the nvJPEG route's) are used where they are: the same numbers.
    on_device = encoder.encode_pixels(torch.from_numpy(pixels).to(cuda), batch_size=8)
    for kind in ("projected", "tower", "pooled"):
        np.testing.assert_array_equal(getattr(on_device, kind), getattr(got, kind))
    # One batch of 40 ≤ batch_size: split into overlap_chunks (2) sub-batches of 20.
    assert encoder.fast.overlap_chunks == 2
    many = photo_pixels(40, arch, seed=6).numpy()
    split = encoder.encode_pixels(many, batch_size=64)
    halves = [encoder.encode_post(encoder.encode_core(many[i : i + 20])) for i in (0, 20)]
    np.testing.assert_allclose(
        split.projected, np.concatenate([h.projected for h in halves]), rtol=1e-6, atol=1e-6
    )
    release(encoder)


# -- memory ------------------------------------------------------------------------------------


def test_peak_device_memory_per_batch_size(vit, cuda, gpu_figures):
    """ViT-L/14-336 in bfloat16 (the GPU default), fast path, eager: peak allocated device memory of
    one encode_core per batch size, and of encode_pixels at the configured batch size (host →
    host, sub-batches in flight); the configured default must leave room on an 80 GB GPU."""
    default = vit_config().encoder.batch_size
    encoder = encoder_on(vit["arch"], vit["master"], cuda, torch.bfloat16)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    figures: dict[str, Any] = {"weights_gib": weights / GIB, "default_batch_size": default, "per_batch": {}}
    total = torch.cuda.get_device_properties(cuda).total_memory
    for size in MEMORY_BATCH_SIZES:
        pixels = torch.randint(0, 256, (size, 3, 336, 336), dtype=torch.uint8, device=cuda)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = encoder.encode_core(pixels)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        figures["per_batch"][str(size)] = {
            "peak_gib": peak / GIB,
            "activations_gib": (peak - before) / GIB,
            "output_gib": sum(t.numel() * t.element_size() for t in out.values()) / GIB,
        }
        del out, pixels
        torch.cuda.empty_cache()
        if peak > 0.6 * total:  # the next size would not fit
            break
    host = np.random.default_rng(0).integers(0, 256, (default, 3, 336, 336), dtype=np.uint8)
    torch.cuda.reset_peak_memory_stats()
    encoder.encode_pixels(host, batch_size=default)  # one call per shard, as the job's actor makes it
    torch.cuda.synchronize()
    figures["encode_pixels_default_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    figures["device_total_gib"] = total / GIB
    gpu_figures["memory_vit_l_bf16_eager"] = figures
    release(encoder)
    at_default = figures["per_batch"][str(default)]["peak_gib"]
    assert at_default < 0.75 * 80 * 1e9 / GIB, figures
    assert figures["encode_pixels_default_peak_gib"] < 0.75 * 80 * 1e9 / GIB, figures
