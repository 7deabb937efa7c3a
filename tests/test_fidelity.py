"""Fidelity: LLaVA's exact features for every checkpoint layout and every input users have.

Every reference here is computed by the real upstream classes (transformers' image processors and
``Llava*`` models, on tiny random-weight checkpoints saved with ``save_pretrained``) or by LLaVA's own
definitions (``tests/llava_reference.py``), never by the product's code. float32 targets: max |Δ| = 0
with the load-time transforms off, ≤ 1e-6 with the defaults; anyres tiles/packed ≤ 1e-5; bfloat16
relative error ≤ 2e-2.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from skimage import data as skdata

import tests.llava_reference as R
from llava_features.cli import main as cli_main
from pipeline.config import load_config
from pipeline.encoder import FeatureEncoder, describe_encoder
from pipeline.images.normalize import normalization_table
from pipeline.images.spec import PreprocessSpec
from pipeline.model import resolve_model
from pipeline.model.config import ModelConfig
from pipeline.model.errors import CheckpointError, ConfigError
from pipeline.model.tiny import TINY_PINPOINTS
from tests.corpus import encode

EXACT = {"fuse_qkv": False, "fold_quick_gelu": False}  # the load-time transforms off


def _png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def _photos() -> dict[str, Image.Image]:
    astronaut, coffee = Image.fromarray(skdata.astronaut()), Image.fromarray(skdata.coffee())
    return {
        "astronaut": astronaut,
        "coffee": coffee,
        "chelsea": Image.fromarray(skdata.chelsea()),
        "camera": Image.fromarray(skdata.camera()).convert("RGB"),
        "very-wide": astronaut.resize((900, 40)),
        "very-tall": coffee.resize((30, 700)),
        "tiny": coffee.resize((7, 5)),
        "tie-40x30": astronaut.resize((40, 30)),  # inside the smallest pinpoint: a tie on the grid
        "odd-451x300": coffee.resize((451, 300)),
    }


PHOTOS = _photos()


def _encoder(model: Path, **settings) -> FeatureEncoder:
    sections = {"model": {"checkpoint": str(model), "dtype": "float32"}}
    for key, value in settings.items():
        section, _, name = key.partition("__")
        sections.setdefault(section, {})[name] = value
    return FeatureEncoder(load_config(None, sections))


def _ours(encoder: FeatureEncoder, data: bytes) -> np.ndarray:
    return np.asarray(encoder.encode_prepared([encoder.encode_pre(data)]).projected[0])


def _max(a: np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    b = b.detach().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# -- 1. the processor's arithmetic, to the bit --------------------------------------------------


def test_normalisation_table_is_the_processors_arithmetic():
    """rescale in float64 then cast, normalise in float32 (transformers' image_transforms): the table
    equals it for all 256 values; the float32 multiply the product used before rounds many of them
    differently (the pad colour's among them)."""
    from transformers.image_transforms import normalize, rescale

    spec = PreprocessSpec()
    values = np.arange(256, dtype=np.uint8)
    image = np.stack([values] * 3, axis=-1)[None]  # (1, 256, 3) channels-last
    last = "channels_last"
    scaled = rescale(image, spec.rescale_factor, input_data_format=last)
    hf = normalize(scaled, spec.image_mean, spec.image_std, input_data_format=last)[0].T
    table = normalization_table(spec)
    assert table.dtype == np.float32 and np.array_equal(table, hf)
    mean = np.asarray(spec.image_mean, np.float32)[:, None]
    std = np.asarray(spec.image_std, np.float32)[:, None]
    float32_multiply = (values.astype(np.float32)[None] * np.float32(spec.rescale_factor) - mean) / std
    differ = table != float32_multiply
    assert differ.sum() > 100 and differ[0, 122] | differ[1, 116] | differ[2, 104]


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_pixels_equal_the_clip_processor_exactly(aspect):
    processor = R.clip_image_processor(336)
    spec = PreprocessSpec.from_image_processor(processor, aspect)
    from pipeline.images.normalize import normalize
    from pipeline.images.preprocess import Preprocessor

    pre = Preprocessor(spec)
    for name, image in PHOTOS.items():
        want = R.process_images([image], processor, aspect)[0]
        got = normalize(pre(_png(image)).pixels, spec)
        assert _max(got.numpy(), want) == 0.0, name


# -- 2. llava-hf: transformers' own classes ------------------------------------------------------


def _llava_hf_variant(tmp_path: Path, source: Path, **processor) -> Path:
    """A copy of the tiny llava-hf checkpoint whose image processor is a LlavaImageProcessor with ``processor``."""
    from transformers import LlavaImageProcessorPil

    out = tmp_path / "variant"
    shutil.copytree(source, out)
    saved = json.loads((out / "preprocessor_config.json").read_text())
    saved.pop("image_processor_type")
    LlavaImageProcessorPil(**{**saved, **processor}).save_pretrained(out)
    return out


@pytest.mark.parametrize("do_pad", [True, False])
def test_llava_hf_do_pad_is_honoured(tiny_models, tmp_path, do_pad):
    """``LlavaImageProcessor(do_pad=...)``: padded to a square with the mean colour (LLaVA's pad) or
    centre-cropped; the features equal LlavaForConditionalGeneration's on the processor's pixels."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    checkpoint = _llava_hf_variant(tmp_path, tiny_models["llava-hf"], do_pad=do_pad)
    assert resolve_model(ModelConfig(checkpoint=str(checkpoint))).image_aspect_ratio == (
        "pad" if do_pad else "crop"
    )
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    encoder = _encoder(checkpoint, model__fuse_qkv=False, model__fold_quick_gelu=False)
    for name in ("astronaut", "very-wide", "very-tall", "tiny"):
        pixels = processor(images=PHOTOS[name], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            want = model.get_image_features(pixel_values=pixels).pooler_output[0]
        assert _max(_ours(encoder, _png(PHOTOS[name])), want) == 0.0, name


def test_llava_hf_features_exact_and_within_1e6_with_the_fast_path(tiny_models):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    checkpoint = tiny_models["llava-hf"]
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    exact, fast = _encoder(checkpoint, **{f"model__{k}": v for k, v in EXACT.items()}), _encoder(checkpoint)
    for name, image in PHOTOS.items():
        with torch.no_grad():
            want = model.get_image_features(
                pixel_values=processor(images=image, return_tensors="pt")["pixel_values"]
            )
        want = want.pooler_output[0]
        assert _max(_ours(exact, _png(image)), want) == 0.0, name
        assert _max(_ours(fast, _png(image)), want) <= 1e-6, name


def test_transformers_5_processor_config_is_read(tiny_models, tmp_path):
    """transformers 5's processors save processor_config.json only (image settings nested under
    "image_processor"): such a checkpoint resolves, with the same pixels and fingerprint."""
    from transformers import AutoTokenizer, LlavaProcessor, PreTrainedTokenizerFast

    source = tiny_models["llava-hf"]
    out = tmp_path / "v5"
    shutil.copytree(source, out)
    (out / "preprocessor_config.json").unlink()
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    from transformers import CLIPImageProcessorPil

    saved = json.loads((source / "preprocessor_config.json").read_text())
    saved.pop("image_processor_type")
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**saved), tokenizer=tokenizer, patch_size=14
    ).save_pretrained(out)
    assert (out / "processor_config.json").is_file() and not (out / "preprocessor_config.json").exists()
    assert "image_processor" in json.loads((out / "processor_config.json").read_text())
    del AutoTokenizer
    a = describe_encoder(load_config(None, {"model": {"checkpoint": str(source)}}))
    b = describe_encoder(load_config(None, {"model": {"checkpoint": str(out)}}))
    assert a.fingerprint == b.fingerprint and a.fields["preprocess"] == b.fields["preprocess"]


# -- 3. LLaVA-NeXT in both layouts ----------------------------------------------------------------


@pytest.mark.parametrize("output", ["tiles", "packed"])
def test_llava_next_hf_equals_transformers(tiny_models, output):
    """tiles: the tower + projector on each of the processor's tiles; packed: get_image_features
    (pack_image_features with image_newline); transformers' pinpoint order and unpad rounding."""
    from transformers import AutoImageProcessor, LlavaNextForConditionalGeneration

    checkpoint = tiny_models["llava-next-hf"]
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    exact = _encoder(
        checkpoint, encoder__anyres_output=output, **{f"model__{k}": v for k, v in EXACT.items()}
    )
    fast = _encoder(checkpoint, encoder__anyres_output=output)
    for name, image in PHOTOS.items():
        inputs = processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            if output == "packed":
                want = model.get_image_features(**inputs).pooler_output[0]
            else:
                n = 1 + np.prod(
                    R.get_anyres_image_grid_shape(
                        image.size, [[w, h] for h, w in model.config.image_grid_pinpoints], 56, False
                    )
                )
                hidden = model.model.vision_tower(
                    inputs["pixel_values"][0][:n], output_hidden_states=True
                ).hidden_states
                want = model.model.multi_modal_projector(hidden[-2][:, 1:])
        assert _max(_ours(exact, _png(image)), want) == 0.0, name
        assert _max(_ours(fast, _png(image)), want) <= 1e-5, name


def _llava_next_reference(checkpoint: Path):
    """LLaVA's own LLaVA-NeXT path for the tiny original-layout checkpoint: its trained tower (read
    from the checkpoint's shards, as from_pretrained loads it), projector and image_newline."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tensors = {}
    for shard in sorted(checkpoint.glob("model*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    config = json.loads((checkpoint / "config.json").read_text())
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(checkpoint / "vision_tower")).eval()
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    projector = R.build_vision_projector(
        type("C", (), config | {"mm_projector_type": config["mm_projector_type"]})()
    )
    projector.load_state_dict(
        {
            k[len("model.mm_projector.") :]: v
            for k, v in tensors.items()
            if k.startswith("model.mm_projector.")
        }
    )
    processor = R.clip_image_processor(56)
    newline = tensors["model.image_newline"]

    def features(image: Image.Image, output: str) -> torch.Tensor:
        tiles = R.process_images(
            [image], processor, "anyres", config["image_grid_pinpoints"], check_size=False
        )[0]
        tile_features = R.encode_images(tower, projector, tiles, config["mm_vision_select_layer"], "patch")
        if output == "tiles":
            return tile_features
        return R.pack_image_features(
            tile_features, image.size, config["image_grid_pinpoints"], 56, newline, check_size=False
        )

    return features


@pytest.mark.parametrize("output", ["tiles", "packed"])
def test_llava_next_original_layout_equals_llava(tiny_models, output):
    """The original layout follows LLaVA: its trained tower from the checkpoint (not the CLIP model
    the config names), [width, height] pinpoints, and unpad's floor."""
    checkpoint = tiny_models["llava-next"]
    reference = _llava_next_reference(checkpoint)
    exact = _encoder(
        checkpoint, encoder__anyres_output=output, **{f"model__{k}": v for k, v in EXACT.items()}
    )
    fast = _encoder(checkpoint, encoder__anyres_output=output)
    assert exact.resolved.tower_in_checkpoint and exact.resolved.image_grid_pinpoints == TINY_PINPOINTS
    for name, image in PHOTOS.items():
        with torch.no_grad():
            want = reference(image.convert("RGB"), output)
        assert _max(_ours(exact, _png(image)), want) == 0.0, name
        assert _max(_ours(fast, _png(image)), want) <= 1e-5, name


def test_unpad_rounding_and_pinpoint_ties_follow_each_layout():
    """Where LLaVA and transformers differ, each layout gets its own reference's numbers."""
    from pipeline.model.anyres import grid_for, unpad

    # 55 * 96/352 = 14.999…: LLaVA's int() keeps 14 lines (cuts 17 + 17 of 48), transformers' round() 15 (16 + 16)
    feature = torch.zeros(1, 48, 96)
    assert unpad(feature, (352, 55), "floor").shape[1] == 14
    assert unpad(feature, (352, 55), "round").shape[1] == 16
    pinpoints = ((336, 672), (672, 336), (672, 672))
    llava = grid_for((300, 200), pinpoints, 336)  # a tie: the earlier candidate wins
    hf = grid_for((300, 200), tuple((h, w) for w, h in pinpoints), 336)  # llava-hf reads the list as [h, w]
    assert (llava.rows, llava.cols) == (2, 1) and (hf.rows, hf.cols) == (1, 2)


def test_vision_feature_layer_list_concatenates_like_transformers(tmp_path, tiny_models):
    from transformers import AutoImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    from pipeline.model.tiny import TINY_TEXT, TINY_VISION

    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **TINY_VISION},
        text_config={"model_type": "llama", **TINY_TEXT},
        vision_feature_layer=[-3, -1],
        vision_feature_select_strategy="default",
        image_token_index=TINY_TEXT["vocab_size"] - 1,
    )
    torch.manual_seed(5)
    model = LlavaForConditionalGeneration(config).eval()
    out = tmp_path / "layers"
    model.save_pretrained(out)
    shutil.copy(tiny_models["llava-hf"] / "preprocessor_config.json", out)
    resolved = resolve_model(ModelConfig(checkpoint=str(out)))
    assert resolved.select_layer == (-3, -1) and resolved.mm_hidden_size == 2 * TINY_VISION["hidden_size"]
    processor = AutoImageProcessor.from_pretrained(out)
    encoder = _encoder(out, **{f"model__{k}": v for k, v in EXACT.items()})
    for name in ("astronaut", "very-wide"):
        with torch.no_grad():
            want = model.get_image_features(
                pixel_values=processor(images=PHOTOS[name], return_tensors="pt")["pixel_values"]
            )
        assert _max(_ours(encoder, _png(PHOTOS[name])), want.pooler_output[0]) == 0.0
    with pytest.raises(CheckpointError, match="several layers are a transformers"):
        resolve_model(ModelConfig(checkpoint=str(tiny_models["llava"]), select_layer=(-3, -1)))


# -- 4. every input users have --------------------------------------------------------------------


def _odd_inputs() -> dict[str, bytes]:
    photo = Image.fromarray(skdata.astronaut()).resize((90, 60))
    out: dict[str, bytes] = {}
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", exif=exif.tobytes())
        out[f"exif-{orientation}.jpg"] = buf.getvalue()
    grey16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    out["grey16.png"] = _png(Image.fromarray(grey16))
    buf = io.BytesIO()
    import zlib  # a 16-bit RGB PNG, written by hand (PIL writes 8-bit RGB only)

    rgb16 = np.stack([grey16, grey16[::-1], grey16[:, ::-1]], axis=-1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    chunk = lambda kind, payload: (  # noqa: E731
        len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
    )
    ihdr = (64).to_bytes(4, "big") + (48).to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    out["rgb16.png"] = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    rgba = np.dstack([np.asarray(photo), np.linspace(0, 255, 90 * 60).reshape(60, 90).astype(np.uint8)])
    out["rgba.png"] = _png(Image.fromarray(rgba, "RGBA"))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    out["palette-transparent.png"] = buf.getvalue()
    out["la.png"] = _png(photo.convert("LA"))
    buf = io.BytesIO()
    photo.convert("CMYK").save(buf, format="JPEG")
    out["cmyk.jpg"] = buf.getvalue()
    out["bilevel.png"] = _png(photo.convert("1"))
    buf = io.BytesIO()
    photo.save(buf, format="GIF")
    out["photo.gif"] = buf.getvalue()
    for name in ("very-wide", "very-tall", "tiny"):
        out[f"{name}.png"] = _png(PHOTOS[name])
    return out


ODD = _odd_inputs()


@pytest.mark.parametrize("layout", ["llava", "llava-hf"])
def test_odd_inputs_equal_each_layouts_reference(tiny_models, layout):
    """LLaVA: ``Image.open(f).convert("RGB")`` then process_images; llava-hf: the processor on the image
    as opened (it composites transparency onto white). EXIF orientation is ignored by both."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    checkpoint = tiny_models[layout]
    encoder = _encoder(checkpoint, **{f"model__{k}": v for k, v in EXACT.items()})
    if layout == "llava-hf":
        model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
        processor = AutoImageProcessor.from_pretrained(checkpoint)
    else:
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel.from_pretrained(checkpoint / "vision_tower").eval()
        processor = R.clip_image_processor(56)
    for name, data in ODD.items():
        image = Image.open(io.BytesIO(data))
        with torch.no_grad():
            if layout == "llava-hf":
                want = model.get_image_features(
                    pixel_values=processor(images=image, return_tensors="pt")["pixel_values"]
                )
                want = want.pooler_output[0]
            else:
                pixels = R.process_images([image.convert("RGB")], processor, "pad")
                want = encoder.projector(R.clip_vision_tower_features(tower, pixels, -2, "patch"))[0]
        assert _max(_ours(encoder, data), want) <= (0.0 if layout == "llava-hf" else 1e-6), name


def test_opt_in_deviations_change_the_numbers_and_the_fingerprint(tiny_models):
    base = load_config(None, {"model": {"checkpoint": str(tiny_models["llava"]), "dtype": "float32"}})
    fingerprints = {describe_encoder(base).fingerprint}
    plain = FeatureEncoder(base)
    for field, value, name in [
        ("exif_transpose", True, "exif-6.jpg"),
        ("sixteen_bit", "high_byte", "grey16.png"),
        ("alpha", "white", "rgba.png"),
    ]:
        config = replace(base, decode=replace(base.decode, **{field: value}))
        fingerprints.add(describe_encoder(config).fingerprint)
        assert _max(_ours(FeatureEncoder(config), ODD[name]), _ours(plain, ODD[name])) > 1e-3, field
    assert len(fingerprints) == 4


def test_bfloat16_relative_error_within_2e2(tiny_models):
    checkpoint = tiny_models["llava-hf"]
    exact = _encoder(checkpoint)
    bf16 = _encoder(checkpoint, model__dtype="bfloat16", encoder__output_dtype="float32")
    for name, image in PHOTOS.items():
        a, b = _ours(exact, _png(image)), _ours(bf16, _png(image))
        assert np.linalg.norm(b - a) / np.linalg.norm(a) <= 2e-2, name


# -- 5. what is not implemented fails at info -----------------------------------------------------


def _edited(tmp_path: Path, source: Path, name: str, **changes) -> Path:
    out = tmp_path / name
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mm_projector_type": "mlp2x_relu"}, "Unknown projector type"),
        ({"mm_patch_merge_type": "maxpool2x2"}, "mm_patch_merge_type 'maxpool2x2' is not implemented"),
        ({"s2": True, "s2_scales": "56,112"}, r"s2: true \(CLIPVisionTowerS2"),
        ({"image_aspect_ratio": "highres"}, "image_aspect_ratio 'highres' is not supported"),
        ({"mm_vision_select_feature": "slicefour_patch"}, "Unexpected select feature"),
        ({"image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": None}, "needs image_grid_pinpoints"),
    ],
)
def test_unimplemented_settings_fail_at_info(tmp_path, tiny_models, capsys, changes, message):
    checkpoint = _edited(tmp_path, tiny_models["llava-next"], "edited", **changes)
    assert cli_main(["info", "--model", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and __import__("re").search(message, err), err


def test_unknown_processor_option_fails_at_info(tmp_path, tiny_models, capsys):
    out = tmp_path / "processor"
    shutil.copytree(tiny_models["llava-hf"], out)
    saved = json.loads((out / "preprocessor_config.json").read_text())
    (out / "preprocessor_config.json").write_text(json.dumps({**saved, "do_thumbnail": True}))
    assert cli_main(["info", "--model", str(out)]) == 2
    assert "['do_thumbnail'] are not implemented" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="packed' with mm_patch_merge_type spatial_unpad needs"):
        no_newline = _edited(
            tmp_path,
            tiny_models["llava"],
            "no-newline",
            image_aspect_ratio="anyres",
            image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS],
            mm_patch_merge_type="spatial_unpad",
        )
        describe_encoder(
            load_config(
                None, {"model": {"checkpoint": str(no_newline)}, "encoder": {"anyres_output": "packed"}}
            )
        )


# -- 6. the fingerprint is the content's ----------------------------------------------------------


def test_fingerprint_does_not_depend_on_the_path(tiny_models, tmp_path):
    for key in ("llava", "llava-hf", "llava-next"):
        copy = tmp_path / f"elsewhere-{key}"
        shutil.copytree(tiny_models[key], copy)
        a = describe_encoder(load_config(None, {"model": {"checkpoint": str(tiny_models[key])}}))
        b = describe_encoder(load_config(None, {"model": {"checkpoint": str(copy)}}))
        assert a.fingerprint == b.fingerprint, key
        assert a.sources["checkpoint"] != b.sources["checkpoint"]
        assert str(copy) not in json.dumps(b.fields) and str(copy) in json.dumps(b.sources)


# -- 7. verify: the proof on the user's own checkpoint --------------------------------------------


@pytest.mark.parametrize("layout", ["llava", "llava-hf", "llava-next", "llava-next-hf"])
def test_verify_passes_for_every_layout(tiny_models, layout):
    from pipeline.verify import sample_images, verify

    config = load_config(
        None, {"model": {"checkpoint": str(tiny_models[layout])}, "encoder": {"anyres_output": "packed"}}
    )
    report = verify(config, dict(list(sample_images().items())[-3:]))
    assert report.passed, report
    assert all(c.rel_error <= 1e-5 for c in report.checks)


def test_verify_reports_a_planted_mismatch(tiny_models, monkeypatch, tmp_path, capsys):
    from pipeline.images import normalize
    from pipeline.verify import sample_images, verify

    config = load_config(None, {"model": {"checkpoint": str(tiny_models["llava-hf"])}})
    images = dict(list(sample_images().items())[-2:])
    original = normalize.normalization_table
    shifted = lambda spec: original(spec) + np.float32(1e-2)  # noqa: E731
    monkeypatch.setattr(normalize, "normalization_table", shifted)
    report = verify(config, images)
    assert not report.passed and all(c.rel_error > 1e-5 for c in report.checks)
    monkeypatch.undo()
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "exif-6.jpg").write_bytes(ODD["exif-6.jpg"])
    rc = cli_main(
        ["verify", "--model", str(tiny_models["llava"]), "--images", str(folder), "--exif-transpose"]
    )
    out = capsys.readouterr().out
    assert rc == 4 and "MISMATCH" in out and "FAIL" in out
    assert cli_main(["verify", "--model", str(tiny_models["llava"]), "--images", str(folder)]) == 0
