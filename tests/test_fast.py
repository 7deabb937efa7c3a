"""The model's fast path (``pipeline/model/fast.py``): load-time transforms match the unfused tower
in float32 and check what they replace; batch buckets plan, pad and slice; the copy/compute
overlap is an ordered loop on a CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from pipeline.bench.arch import KNOWN_TOWERS
from pipeline.model import CLIPVisionTower
from pipeline.model import fast as fastpath
from pipeline.model.tiny import TINY_VISION

VIT_L = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]


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
    attn = tower.vision_core.encoder.layers[0].self_attn
    assert isinstance(attn, fastpath.FusedQKVAttention)
    assert attn.qkv.weight.shape == (3 * 32, 32)
    eager = _tower(TINY_VISION, attn="eager")
    assert fastpath.fuse_qkv(eager) == 0
    folded = fastpath.fold_quick_gelu(tower)
    assert folded == 3 and isinstance(tower.vision_core.encoder.layers[0].mlp, fastpath.SiLUFoldedMLP)


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


# -- buckets and padding ----------------------------------------------------------


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


# -- the transforms check what they replace -----------------------------------------------------


def test_fold_refuses_an_activation_that_is_not_quick_gelu():
    """A tower whose config says quick_gelu but whose MLP computes something else is not folded."""
    from pipeline.model.errors import ModelStateError

    tower = _tower(TINY_VISION)
    tower.vision_core.encoder.layers[0].mlp.activation_fn = torch.nn.GELU()
    with pytest.raises(
        ModelStateError,
        match=r"fold_quick_gelu: the MLP's activation_fn GELU is not quick_gelu \(transformers ",
    ):
        fastpath.fold_quick_gelu(tower)


def test_fuse_refuses_an_unknown_attention_structure(monkeypatch):
    from pipeline.model.errors import ModelStateError

    tower = _tower(TINY_VISION)
    attn = tower.vision_core.encoder.layers[0].self_attn
    attn.q_proj = torch.nn.Linear(32, 16)
    with pytest.raises(
        ModelStateError,
        match=r"expected CLIPAttention\.q_proj to be Linear\(32, 32\), found Linear\(32, 16\)",
    ):
        fastpath.fuse_qkv(tower)
    # A replacement that computes something else is caught by the numeric probe.
    tower = _tower(TINY_VISION)
    original = fastpath.FusedQKVAttention.from_attention.__func__

    def swapped(cls, attn):
        fused = original(cls, attn)
        with torch.no_grad():
            fused.qkv.weight[32:64], fused.qkv.weight[64:] = (
                fused.qkv.weight[64:].clone(),
                fused.qkv.weight[32:64].clone(),
            )
        return fused

    monkeypatch.setattr(fastpath.FusedQKVAttention, "from_attention", classmethod(swapped))
    with pytest.raises(ModelStateError, match="differs from the original"):
        fastpath.fuse_qkv(tower)
