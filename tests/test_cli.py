"""The command line and configuration: tiny checkpoints, info, config files and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_features.cli import main as cli_main
from pipeline.config import Config, config_to_dict, load_config
from pipeline.encoder import describe_encoder
from pipeline.model import resolve_device, resolve_dtype, resolve_model
from pipeline.model.config import ModelConfig
from pipeline.model.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("fmt", "weights"), [("llava", "bin"), ("llava-hf", "safetensors"), ("clip", "safetensors")]
)
def test_make_tiny_model_and_info(fmt, weights, tmp_path, capsys):
    assert cli_main(["make-tiny-model", str(tmp_path / "m"), "--format", fmt, "--weights", weights]) == 0
    out = capsys.readouterr().out
    flag, path = out.strip().split("Use it with: ")[1].split(" ", 1)
    assert cli_main(["info", flag, path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["fingerprint"]) == 64
    assert info["encoder"]["model"]["format"] == fmt
    assert info["encoder"]["model"]["projector_type"] == "mlp2x_gelu"
    assert info["encoder"]["compute_dtype"] == "float32" and info["encoder"]["output_dtype"] == "float16"
    assert info["resampler"] in ("compiled", "compiled-avx2")  # the tiny model's processor is bicubic
    if weights == "bin":
        assert list((tmp_path / "m").glob("pytorch_model-*.bin")) and not list(
            (tmp_path / "m").glob("*.safetensors")
        )


def test_default_dtype_and_device():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_shipped_configs_load_and_override_only_known_keys():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name == "serve.yaml":  # a Ray Serve config, not ours
            continue
        cfg = load_config(path)
        assert isinstance(cfg, Config)
    seven = load_config(REPO / "configs" / "llava-v1.5-7b.yaml").model
    assert (seven.vision_tower, seven.select_layer, seven.select_feature) == (
        "openai/clip-vit-large-patch14-336",
        -2,
        "patch",
    )
    assert (seven.projector_type, seven.mm_hidden_size, seven.hidden_size, seven.image_aspect_ratio) == (
        "mlp2x_gelu",
        1024,
        4096,
        "pad",
    )
    assert load_config(REPO / "configs" / "llava-v1.5-13b.yaml").model.hidden_size == 5120


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  select_layr: -2\n")
    with pytest.raises(ConfigError, match="Unknown key\\(s\\) in section 'model': \\['select_layr'\\]"):
        load_config(bad)
    bad.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match="Unknown config section"):
        load_config(bad)
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="Unknown projector type"):
        ModelConfig(projector_type="mlp2x_relu")
    with pytest.raises(ConfigError, match="Unexpected select feature"):
        ModelConfig(select_feature="cls")


def test_cli_overrides_win_and_change_the_fingerprint(tiny_llava):
    base = load_config(None, {"model": {"checkpoint": str(tiny_llava)}})
    other = load_config(None, {"model": {"checkpoint": str(tiny_llava), "select_layer": 1}})
    assert describe_encoder(base).fingerprint != describe_encoder(other).fingerprint
    assert (
        describe_encoder(base).fingerprint
        == describe_encoder(load_config(None, {"model": {"checkpoint": str(tiny_llava)}})).fingerprint
    )
    assert resolve_model(other.model).select_layer == 1
    assert config_to_dict(other)["model"]["select_layer"] == 1


def test_cli_reports_typed_errors_with_exit_code(tmp_path, capsys):
    rc = cli_main(["info", "--model", str(tmp_path)])
    assert rc == 2
    assert "checkpoint_not_found" in capsys.readouterr().err
