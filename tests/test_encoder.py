"""The one encoder (``pipeline/encoder.py``): its fast path against the plain one, buckets with
compilation, zero-row results, host results as numpy in every output dtype."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.bench.arch import tiny_arch
from pipeline.config import Config
from pipeline.encoder import FeatureEncoder
from pipeline.model import fast as fastpath


def _tiny_encoder(variant: str) -> FeatureEncoder:
    """A tiny random-weight encoder of the benchmark's ``variant`` (plain, fast, compiled) that
    returns both feature kinds and the pooled vector."""
    from pipeline.bench.encoder import make_bench_encoder
    from pipeline.bench.models import random_modules

    arch = tiny_arch()
    modules = random_modules(arch)
    device = torch.device("cpu")
    return make_bench_encoder(
        Config(),
        arch,
        modules,
        device=device,
        dtype=torch.float32,
        variant=variant,
        batch_sizes=(4, 8),
        features="both",
        pooled=True,
    )


def test_encoder_fast_path_matches_plain_and_keeps_outputs():
    pixels = np.random.default_rng(0).integers(0, 256, (11, 3, 56, 56), dtype=np.uint8)
    plain, fast = _tiny_encoder("plain"), _tiny_encoder("fast")
    a, b = plain.encode_pixels(pixels, batch_size=4), fast.encode_pixels(pixels, batch_size=4)
    assert fast.fast.transforms == {"fuse_qkv": 3, "fold_quick_gelu": 3}
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
    seen = []
    run_model = FeatureEncoder._run_model

    def spy(self, values, project, keep_tower):
        seen.append(values.shape[0])
        return run_model(self, values, project, keep_tower)

    monkeypatch.setattr(FeatureEncoder, "_run_model", spy)
    enc = _tiny_encoder("compiled")  # its compiled function is the (spied) eager one
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
    """Fast-path settings are checked when the config is built, not at the first encode."""
    from pipeline.config import load_config
    from pipeline.model.errors import ConfigError

    with pytest.raises(ConfigError, match="overlap_chunks"):
        replace(Config().model, overlap_chunks=0)
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(None, {"model": {"compile_mode": "fastest"}})
    with pytest.raises(ConfigError, match="batch_buckets"):
        load_config(None, {"encoder": {"batch_buckets": [8, 0]}})


@pytest.mark.slow
def test_torch_compile_with_buckets_on_cpu():
    pixels = np.random.default_rng(2).integers(0, 256, (11, 3, 56, 56), dtype=np.uint8)
    ref = _tiny_encoder("fast").encode_pixels(pixels, batch_size=8)
    enc = _tiny_encoder("compiled")
    enc.warmup()
    got = enc.encode_pixels(pixels, batch_size=8)
    np.testing.assert_allclose(got.projected, ref.projected, atol=1e-4)
