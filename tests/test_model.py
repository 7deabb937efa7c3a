"""Model core: parity with LLaVA's own tower forward and with transformers' LLaVA, loading, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import CLIPVisionModel

from pipeline.config import load_config
from pipeline.model import (
    CLIPVisionTower,
    IdentityMap,
    ModelConfig,
    build_vision_projector,
    load_model_modules,
    resolve_model,
)
from pipeline.model.checkpoints.files import CheckpointSource as _Source
from pipeline.model.checkpoints.files import read_tensors
from pipeline.model.errors import CheckpointError, ErrorCode, MissingWeightError, ShapeMismatchError
from pipeline.model.tiny import TINY_VISION
from tests.llava_reference import clip_vision_tower_features as seed_forward

TOL = 1e-5


@pytest.fixture(scope="module")
def tower_dir(tiny_llava: Path) -> Path:
    return tiny_llava / "vision_tower"


@pytest.fixture(scope="module")
def reference_model(tower_dir: Path) -> CLIPVisionModel:
    return CLIPVisionModel.from_pretrained(tower_dir, attn_implementation="eager").eval()


@pytest.mark.parametrize("layer", [-1, -2, -3, -4, 0, 1, 2, 3])
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_tower_matches_seed_forward(tower_dir, reference_model, layer, feature):
    args = SimpleNamespace(mm_vision_select_layer=layer, mm_vision_select_feature=feature)
    tower = CLIPVisionTower(str(tower_dir), args, dtype="float32", device="cpu")
    torch.manual_seed(layer + 10)
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = seed_forward(reference_model, images, layer, feature)
    got = tower(images)
    assert got.shape == expected.shape == (3, 16 + (feature == "cls_patch"), 32)
    assert (got - expected).abs().max().item() <= TOL
    # list input: one (1, N, D) tensor per image, same numbers
    got_list = tower([images[i] for i in range(3)])
    assert isinstance(got_list, list) and len(got_list) == 3
    for i, feats in enumerate(got_list):
        assert feats.shape == (1, *expected.shape[1:])
        assert (feats[0] - expected[i]).abs().max().item() <= TOL


def test_tower_runs_only_needed_layers(tower_dir):
    tower = CLIPVisionTower(str(tower_dir), {"mm_vision_select_layer": -2}, device="cpu")
    calls = []
    for i, layer in enumerate(tower.vision_tower.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    tower(torch.randn(1, 3, 56, 56))
    assert calls == [0, 1]  # 3 layers; hidden_states[-2] is the output of layer 1


def test_list_input_is_batched_and_keeps_order_and_dtype(tower_dir, reference_model):
    tower = CLIPVisionTower(str(tower_dir), {"mm_vision_select_layer": -2}, device="cpu")
    calls = []
    tower.vision_tower.embeddings.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    torch.manual_seed(0)
    images = [torch.randn(3, 56, 56) for _ in range(5)]
    images[2] = images[2].double()  # a different dtype forms its own group and comes back in its dtype
    feats = tower(images)
    assert sorted(calls) == [1, 4]  # two batches, not five calls
    assert feats[2].dtype == torch.float64 and feats[0].dtype == torch.float32
    with torch.no_grad():
        for i, image in enumerate(images):
            ref = seed_forward(reference_model, image.float()[None], -2, "patch")
            assert (feats[i].float() - ref).abs().max().item() <= TOL


def test_output_in_input_dtype_and_bfloat16_compute(tower_dir, reference_model):
    tower = CLIPVisionTower(str(tower_dir), {"mm_vision_select_layer": -2}, dtype="bfloat16", device="cpu")
    assert tower.dtype == torch.bfloat16
    images = torch.randn(2, 3, 56, 56)
    got = tower(images)
    assert got.dtype == torch.float32
    with torch.no_grad():
        ref = seed_forward(reference_model, images, -2, "patch")
    rel = (got - ref).norm() / ref.norm()
    assert rel.item() < 2e-2


def test_properties_and_delay_load(tower_dir, caplog):
    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    tower = CLIPVisionTower(str(tower_dir), args, delay_load=True)
    assert not tower.is_loaded and not hasattr(tower, "vision_tower")
    assert tower.config is tower.cfg_only
    assert tower.hidden_size == 32 and tower.num_patches_per_side == 4 and tower.num_patches == 16
    tower.load_model()
    assert tower.is_loaded and tower.config.hidden_size == 32
    assert all(not p.requires_grad for p in tower.vision_tower.parameters())
    assert tower.image_processor.crop_size["height"] == 56
    model_before = tower.vision_tower
    with caplog.at_level(logging.WARNING):
        tower.load_model()
    assert "already loaded" in caplog.text and tower.vision_tower is model_before
    assert tower.dummy_feature.shape == (1, 32) and tower.dummy_feature.abs().sum() == 0
    assert tower.dtype == torch.float32 and tower.device.type == "cpu"
    unfrozen = CLIPVisionTower(
        str(tower_dir),
        SimpleNamespace(mm_vision_select_layer=-2, unfreeze_mm_vision_tower=True),
        delay_load=True,
    )
    assert unfrozen.is_loaded


def test_bad_select_feature_and_layer(tower_dir):
    with pytest.raises(ValueError, match="Unexpected select feature: 'cls'"):
        CLIPVisionTower(str(tower_dir), {"mm_vision_select_layer": -2, "mm_vision_select_feature": "cls"})
    with pytest.raises(ValueError, match="out of range"):
        CLIPVisionTower(str(tower_dir), {"mm_vision_select_layer": 7})


@pytest.mark.parametrize(
    ("ptype", "layers"),
    [
        ("linear", [nn.Linear]),
        ("mlp1x_gelu", [nn.Linear]),
        ("mlp2x_gelu", [nn.Linear, nn.GELU, nn.Linear]),
        ("mlp4x_gelu", [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]),
    ],
)
def test_projector_types(ptype, layers):
    proj = build_vision_projector(SimpleNamespace(mm_projector_type=ptype, mm_hidden_size=8, hidden_size=12))
    modules = [proj] if isinstance(proj, nn.Linear) else list(proj)
    assert [type(m) for m in modules] == layers
    x = torch.randn(2, 5, 8)
    y = proj(x)
    assert y.shape == (2, 5, 12)
    ref = x
    for m in modules:
        ref = m(ref)
    assert torch.equal(y, ref)


def test_identity_and_unknown_projectors():
    ident = build_vision_projector({"mm_projector_type": "identity"})
    x = torch.randn(2, 3)
    assert (
        isinstance(ident, IdentityMap) and ident(x) is x and ident.config == {"mm_projector_type": "identity"}
    )
    assert isinstance(
        build_vision_projector({"mm_hidden_size": 4, "hidden_size": 5}), nn.Linear
    )  # default linear
    for bad in ("mlp0x_gelu", "mlp2x_relu", "conv"):
        with pytest.raises(ValueError, match="valid types are 'linear', 'identity' and 'mlp\\{N\\}x_gelu'"):
            build_vision_projector({"mm_projector_type": bad, "mm_hidden_size": 4, "hidden_size": 5})


def _features(cfg: ModelConfig, images: torch.Tensor) -> torch.Tensor:
    tower, projector = load_model_modules(resolve_model(cfg), dtype="float32", device="cpu")
    with torch.no_grad():
        return projector(tower(images))


def test_all_checkpoint_formats_give_the_same_features(tiny_models):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 56, 56)
    ref = _features(ModelConfig(checkpoint=str(tiny_models["llava"])), images)
    assert ref.shape == (2, 16, 64)
    for key in ("llava-bin", "llava-hf", "llava-hf-bin"):
        got = _features(ModelConfig(checkpoint=str(tiny_models[key])), images)
        assert (got - ref).abs().max().item() <= TOL, key
    for key in ("clip", "clip-bin"):
        got = _features(load_config(tiny_models[key]).model, images)
        assert (got - ref).abs().max().item() <= TOL, key


def test_llava_matches_seed_tower_plus_projector(tiny_models, reference_model):
    resolved = resolve_model(ModelConfig(checkpoint=str(tiny_models["llava"])))
    assert (resolved.select_layer, resolved.select_feature, resolved.projector_type) == (
        -2,
        "patch",
        "mlp2x_gelu",
    )
    assert (resolved.mm_hidden_size, resolved.hidden_size, resolved.image_aspect_ratio) == (32, 64, "pad")
    tower, projector = load_model_modules(resolved, dtype="float32", device="cpu")
    proj_ref = build_vision_projector(
        {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32, "hidden_size": 64}
    )
    tensors, _ = read_tensors(_Source(str(tiny_models["llava"])), ("model.mm_projector.",))
    proj_ref.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in tensors.items()})
    images = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        expected = proj_ref(seed_forward(reference_model, images, -2, "patch"))
        got = projector(tower(images))
    assert (got - expected).abs().max().item() <= TOL


def test_llava_hf_matches_transformers_get_image_features(tiny_models):
    from transformers import LlavaForConditionalGeneration

    ref_model = LlavaForConditionalGeneration.from_pretrained(
        tiny_models["llava-hf"], attn_implementation="eager"
    ).eval()
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        out = ref_model.get_image_features(
            pixel_values=images, vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
    expected = torch.stack(list(out.pooler_output)) if not isinstance(out, torch.Tensor) else out
    got = _features(ModelConfig(checkpoint=str(tiny_models["llava-hf"])), images)
    assert got.shape == expected.shape == (3, 16, 64)
    assert (got - expected).abs().max().item() <= TOL
    # "full" keeps CLS, as transformers does
    with torch.no_grad():
        full = ref_model.get_image_features(
            pixel_values=images, vision_feature_layer=-1, vision_feature_select_strategy="full"
        )
    full = torch.stack(list(full.pooler_output)) if not isinstance(full, torch.Tensor) else full
    got_full = _features(
        ModelConfig(checkpoint=str(tiny_models["llava-hf"]), select_layer=-1, select_feature="cls_patch"),
        images,
    )
    assert got_full.shape == (3, 17, 64) and (got_full - full).abs().max().item() <= TOL


def test_only_projector_shards_are_opened(tiny_models):
    root = tiny_models["llava"]
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    holding = {shard for key, shard in index.items() if key.startswith("model.mm_projector.")}
    assert len(set(index.values())) > len(holding) >= 1  # the checkpoint has LM-only shards
    tensors, opened = read_tensors(_Source(str(root)), ("model.mm_projector.",))
    assert {p.name for p in opened} == holding
    assert tensors and all(k.startswith("model.mm_projector.") for k in tensors)


def test_overrides_win_over_checkpoint(tiny_models):
    r = resolve_model(
        ModelConfig(
            checkpoint=str(tiny_models["llava"]),
            select_layer=1,
            select_feature="cls_patch",
            image_aspect_ratio="crop",
        )
    )
    assert (r.select_layer, r.select_feature, r.image_aspect_ratio, r.num_tokens) == (
        1,
        "cls_patch",
        "crop",
        17,
    )
    tower, _ = load_model_modules(r, device="cpu")
    assert tower(torch.randn(1, 3, 56, 56)).shape == (1, 17, 32)


def test_projector_shape_mismatch_names_key_and_shapes(tiny_models):
    with pytest.raises(ShapeMismatchError) as info:
        resolve_model(ModelConfig(checkpoint=str(tiny_models["llava"]), hidden_size=48))
    msg = str(info.value)
    assert "'0.weight'" in msg and "(64, 32)" in msg and "(48, 32)" in msg
    assert info.value.code == ErrorCode.SHAPE_MISMATCH


def test_projector_missing_key_is_named(tiny_models):
    with pytest.raises(MissingWeightError, match="missing weight '4.weight'"):
        resolve_model(ModelConfig(checkpoint=str(tiny_models["llava"]), projector_type="mlp3x_gelu"))


def test_missing_checkpoint_and_unknown_format(tmp_path):
    with pytest.raises(CheckpointError, match="No config.json"):
        resolve_model(ModelConfig(checkpoint=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="Cannot tell the format"):
        resolve_model(ModelConfig(checkpoint=str(tmp_path)))
    with pytest.raises(CheckpointError, match="No model given"):
        resolve_model(ModelConfig())


def test_clip_without_projector_weights_needs_identity(tiny_models):
    tower_dir = tiny_models["llava"] / "vision_tower"
    with pytest.raises(CheckpointError, match="needs weights"):
        resolve_model(ModelConfig(vision_tower=str(tower_dir), projector_type="linear", hidden_size=8))
    r = resolve_model(ModelConfig(vision_tower=str(tower_dir)))
    assert r.projector_type == "identity" and r.feature_dim == TINY_VISION["hidden_size"]


def test_model_id_from_local_hf_cache(tiny_models, tmp_path, monkeypatch):
    """A model id resolves from the local HF cache (hub layout: models--org--name/snapshots/<rev>)."""
    import shutil

    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--tiny--llava-hf" / "snapshots" / rev
    shutil.copytree(tiny_models["llava-hf"], snap)
    (tmp_path / "hub" / "models--tiny--llava-hf" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--llava-hf" / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    r = resolve_model(ModelConfig(checkpoint="tiny/llava-hf"))
    assert r.format == "llava-hf" and r.tower_revision == rev
    ref = resolve_model(ModelConfig(checkpoint=str(tiny_models["llava-hf"])))
    assert r.tower_sha256 == ref.tower_sha256 and r.projector_sha256 == ref.projector_sha256


def test_product_encoder_path_matches_seed(tiny_models, reference_model):
    """FeatureEncoder (uint8 in, on-device normalization, fast-path transforms on) equals the seed's
    forward on CLIPImageProcessor-normalized pixels, then the projector."""
    import numpy as np

    from pipeline.config import load_config
    from pipeline.encoder import FeatureEncoder
    from pipeline.images.normalize import normalize

    encoder = FeatureEncoder(
        load_config(
            None,
            {
                "model": {"checkpoint": str(tiny_models["llava"]), "dtype": "float32"},
                "encoder": {"features": "both"},
            },
        )
    )
    assert encoder.config.model.fuse_qkv and encoder.config.model.fold_quick_gelu
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 3, 56, 56), dtype=np.uint8)
    got = encoder.encode_pixels(pixels, batch_size=2)
    _, projector = load_model_modules(
        resolve_model(ModelConfig(checkpoint=str(tiny_models["llava"]))), device="cpu"
    )
    with torch.no_grad():
        tower_ref = seed_forward(
            reference_model, normalize(torch.from_numpy(pixels), encoder.spec), -2, "patch"
        )
        proj_ref = projector(tower_ref)
    assert got.tower.dtype == np.float32 and got.projected.shape == (5, 16, 64)
    assert np.abs(got.tower - tower_ref.numpy()).max() <= TOL
    assert np.abs(got.projected - proj_ref.numpy()).max() <= TOL
