"""The compiled resampler (pipeline/images/_resample.c): bit-identical to Pillow's resize, every kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import native, passes
from pipeline.images.native import resampler_name
from pipeline.images.passes import expand2square
from pipeline.images.preprocess import Preprocessor
from pipeline.images.spec import PreprocessSpec, resize_output_size

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resample_module():
    module = native.compiled_resampler(3)
    assert module is not None, "pipeline.images._resample is not built (pip install -e . builds it)"
    return module


def test_the_compiled_resampler_is_built_and_used(resample_module):
    # The 2x preprocessing speed depends on it: a build that silently fell back must fail here.
    assert resampler_name(3) in ("compiled", "compiled-avx2")
    assert resampler_name(2) == resampler_name(4) == resampler_name(3)
    assert resampler_name(1) == resampler_name(5) == "pillow"  # LANCZOS, HAMMING: Pillow's passes


def _window(module, image, out_hw, window, resample, canvas=None, background=(0, 0, 0)):
    """``module.resize_window`` on a PIL image; canvas=(side, side) for expand2square."""
    canvas = canvas or (image.height, image.width)
    model = passes.pass_model(resample)
    hfirst = model.horizontal_first(canvas[1], canvas[0], out_hw[1], out_hw[0])
    return native.compiled_window(module, image, canvas, background, out_hw, window, resample, hfirst)


def _check_random_geometries(module, trials: int, seed: int) -> int:
    """Random sizes (up and down, extreme ratios, 1-pixel sides), windows, filters, padding."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)
    noise[:300:7] = 255  # saturated rows and flat regions exercise the clipping
    noise[300:450] = noise[300:450] // 85 * 85
    checked = 0
    for trial in range(trials):
        w, h = (int(v) for v in rng.integers(1, 900, 2))
        if trial % 5 == 1:
            h = max(1, w // int(rng.integers(3, 40)))
        elif trial % 5 == 2:
            w = max(1, h // int(rng.integers(3, 40)))
        ow, oh = (int(v) for v in rng.integers(1, 500, 2))
        resample = (3, 2, 4)[trial % 3]
        image = Image.fromarray(np.ascontiguousarray(noise[:h, :w]))
        pad = trial % 4 == 3
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        source = expand2square(image, background) if pad else image
        if pad:
            ow = oh  # expand2square then a square resize, as LLaVA does
        model = passes.pass_model(resample)
        if pad and not model.horizontal_first(source.width, source.height, ow, oh):
            continue
        top, left = int(rng.integers(0, oh)), int(rng.integers(0, ow))
        window = (top, left, int(rng.integers(1, oh - top + 1)), int(rng.integers(1, ow - left + 1)))
        want = np.asarray(source.resize((ow, oh), resample)).transpose(2, 0, 1)
        t, lf, ch, cw = window
        canvas = (source.height, source.width) if pad else None
        got_full = _window(module, image, (oh, ow), (0, 0, oh, ow), resample, canvas, background)
        got = _window(module, image, (oh, ow), window, resample, canvas, background)
        where = f"{w}x{h} -> {ow}x{oh} filter {resample} pad {pad} window {window}"
        np.testing.assert_array_equal(got_full, want, err_msg=where)
        np.testing.assert_array_equal(got, want[:, t : t + ch, lf : lf + cw], err_msg=where)
        checked += 1
    return checked


def test_bit_identical_to_pillow_on_random_geometries(resample_module):
    assert _check_random_geometries(resample_module, trials=240, seed=7) >= 200


def test_portable_kernels_are_bit_identical_too():
    """The same checks with the SIMD kernels switched off (what a CPU without AVX2 runs)."""
    code = textwrap.dedent(
        """
        from pipeline.images import native
        from tests.test_resample import _check_random_geometries
        module = native.compiled_resampler(3)
        assert module is not None and module.SIMD == 0, module
        print("checked", _check_random_geometries(module, trials=80, seed=11))
        """
    )
    env = {**os.environ, "LLAVA_FEATURES_RESAMPLE_NO_SIMD": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 60


def test_end_to_end_pixels_match_plain_pillow_for_photos_sizes(resample_module):
    """Typical photo sizes through Preprocessor.pixels (pad and crop, 224 and 336) vs Pillow."""
    rng = np.random.default_rng(3)
    for w, h in [(640, 480), (480, 640), (1024, 768), (4032, 3024), (337, 335), (336, 336), (100, 60)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for size in (224, 336):
            for aspect_ratio in ("pad", "crop"):
                spec = PreprocessSpec(size=size, crop_height=size, crop_width=size, aspect_ratio=aspect_ratio)
                square = expand2square(image, spec.background) if aspect_ratio == "pad" else image
                new_h, new_w = resize_output_size(square.height, square.width, size)
                plain = np.asarray(square.resize((new_w, new_h), 3))
                top, left = (new_h - size) // 2, (new_w - size) // 2
                want = plain[top : top + size, left : left + size].transpose(2, 0, 1)
                np.testing.assert_array_equal(Preprocessor(spec).pixels(image), want, err_msg=f"{w}x{h}")


def test_concurrent_calls_release_the_gil_and_stay_exact(resample_module):
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(8)]
    pre = Preprocessor(PreprocessSpec())
    serial = [pre.pixels(img) for img in images]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(pre.pixels, images * 4))
    for i, got in enumerate(parallel):
        np.testing.assert_array_equal(got, serial[i % len(images)])


def test_inconsistent_arguments_are_refused(resample_module):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    out = np.empty((3, 5, 5), dtype=np.uint8)
    ok = dict(canvas=(10, 20), offset=(0, 0), bg=(0, 0, 0), out_hw=(5, 5), window=(0, 0, 5, 5))

    def call(arr=arr, h=10, w=20, out=out, filt=3, hfirst=True, **kw):
        a = {**ok, **kw}
        resample_module.resize_window(
            arr, h, w, out, a["canvas"], a["offset"], a["bg"], a["out_hw"], a["window"], filt, hfirst
        )

    call()  # valid
    with pytest.raises(ValueError, match="inconsistent"):
        call(window=(1, 0, 5, 5))  # window outside the output
    with pytest.raises(ValueError, match="inconsistent"):
        call(canvas=(10, 10))  # canvas smaller than the image
    with pytest.raises(ValueError, match="src is smaller"):
        call(arr=arr[:5])
    with pytest.raises(ValueError, match="dst is smaller"):
        call(out=np.empty((3, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="unsupported filter"):
        call(filt=1)
    with pytest.raises(ValueError, match="horizontal_first"):
        call(canvas=(20, 20), offset=(5, 0), hfirst=False)
    with pytest.raises(TypeError):
        call(out=b"\0" * 75)  # read-only destination


def test_a_copy_of_the_sources_without_the_build_uses_the_installed_build(tmp_path, resample_module):
    """What `ray job submit --working-dir .` gives the workers: the sources minus .gitignore'd build
    outputs, first on sys.path. The preprocessing still finds the installed package's build."""
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("*.so", "*.pyd"))
    code = (
        "import pipeline, pipeline.images.native as n; print(pipeline.__file__); print(n.resampler_name(3))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    origin, name = done.stdout.split()[-2:]
    assert Path(origin).resolve().parent == (tmp_path / "pipeline").resolve()  # the copy is imported
    assert name == resampler_name(3)
