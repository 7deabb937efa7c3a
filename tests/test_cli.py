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
    assert cli_main(["info", "--json", flag, path]) == 0
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


def test_encode_options_of_the_table_are_checked_before_anything_runs(tmp_path, capsys):
    """--resume and --append exclude each other; the tensor formats are the table's (binary, list);
    both refused by the parser (exit 2) before a model is loaded or an output touched."""
    out = tmp_path / "o"
    base = ["encode", "--model", str(tmp_path / "none"), "--input", str(tmp_path), "--output", str(out)]
    with pytest.raises(SystemExit) as info:
        cli_main([*base, "--resume", "--append"])
    assert info.value.code == 2 and "--append: not allowed with argument --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli_main([*base, "--tensor-format", "fixed_shape_tensor"])
    err = capsys.readouterr().err.replace("'", "")  # Python versions quote the choices or not
    assert info.value.code == 2 and "invalid choice: fixed_shape_tensor (choose from binary, list)" in err
    assert not out.exists()


def test_info_says_in_one_line_what_the_features_are(tiny_llava, capsys):
    assert cli_main(["info", "--model", str(tiny_llava)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"features: 16 × 64 float16 per image (2.0 kB) from layer -2 of {tiny_llava / 'vision_tower'}, "
        "projector mlp2x_gelu"
    )
    assert len(lines) <= 8 and not any(line.lstrip().startswith(("{", '"')) for line in lines)
    fingerprint = describe_encoder(load_config(None, {"model": {"checkpoint": str(tiny_llava)}})).fingerprint
    assert f"fingerprint:   {fingerprint}" in lines
    assert any(line.startswith("checkpoint:") and "(llava layout)" in line for line in lines)
    assert any(line.startswith("preprocessing:") and "center crop 56 × 56" in line for line in lines)
    assert any(line.startswith("resize route:") for line in lines)
    assert (
        cli_main(["info", "--model", str(tiny_llava), "--features", "both", "--pooled", "--dtype", "float32"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("features: 16 × 64 float32 per image (4.1 kB) from layer -2")
    assert lines[1].startswith("tower_features: 16 × 32 float32 per image (2.0 kB)")
    assert lines[2] == "pooled: 64 float32 per image (the mean over tokens)"


def test_info_line_for_llava_1_5_7b():
    """The line for LLaVA-1.5-7B's vision path (its resolved description, built here: no download)."""
    from llava_features.cli import info_lines
    from pipeline.bench.arch import clip_image_processor_dict
    from pipeline.model import ResolvedModel

    cfg = load_config(REPO / "configs" / "llava-v1.5-7b.yaml")
    resolved = ResolvedModel(
        format="llava",
        checkpoint="liuhaotian/llava-v1.5-7b",
        vision_tower="openai/clip-vit-large-patch14-336",
        tower_revision=None,
        tower_sha256="0" * 64,
        select_layer=-2,
        select_feature="patch",
        projector_type="mlp2x_gelu",
        mm_hidden_size=1024,
        hidden_size=4096,
        projector_sha256="0" * 64,
        projector_weights="liuhaotian/llava-v1.5-7b",
        image_aspect_ratio="pad",
        image_processor=clip_image_processor_dict(336),
        vision_config={},
        image_size=336,
        patch_size=14,
    )
    desc = describe_encoder(cfg, resolved)
    lines = info_lines(cfg, resolved, desc.fields, desc.fingerprint, "compiled")
    assert lines[0] == (
        "features: 576 × 4096 float16 per image (4.7 MB) from layer -2 of openai/clip-vit-large-patch14-336, "
        "projector mlp2x_gelu"
    )
    assert "resize the shortest side to 336 (bicubic), center crop 336 × 336" in lines[3]


def test_info_json_shows_the_resolved_settings(tiny_llava, capsys):
    """`info --json`: the model settings the config left null are shown as the checkpoint resolves them."""
    assert cli_main(["info", "--json", "--model", str(tiny_llava)]) == 0
    info = json.loads(capsys.readouterr().out)
    model = info["config"]["model"]
    resolved = resolve_model(ModelConfig(checkpoint=str(tiny_llava)))
    assert (model["select_layer"], model["select_feature"], model["projector_type"]) == (
        -2,
        "patch",
        "mlp2x_gelu",
    )
    assert (model["mm_hidden_size"], model["hidden_size"], model["image_aspect_ratio"]) == (32, 64, "pad")
    assert (
        model["vision_tower"] == resolved.vision_tower
        and model["projector_weights"] == resolved.projector_weights
    )
    assert info["config"]["encoder"]["output_dtype"] == "float16"
    assert "model.select_layer" in info["resolved_keys"] and "encoder.output_dtype" in info["resolved_keys"]
    assert all(
        model[key.split(".")[1]] is not None for key in info["resolved_keys"] if key.startswith("model.")
    )
    # A value the config sets is its own, not marked as resolved.
    assert cli_main(["info", "--json", "--model", str(tiny_llava), "--select-layer", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["model"]["select_layer"] == 1 and "model.select_layer" not in info["resolved_keys"]


def test_info_line_for_llava_next_tiles_and_packed(tiny_models, capsys):
    model = str(tiny_models["llava-next"])  # pinpoints 56x112, 112x56, 112x112 of 56 px tiles
    assert cli_main(["info", "--model", model]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "features: (1 + tiles) × 16 × 64 float16 per image: the base image and 2 to 4 tiles by its grid "
        f"(2.0 kB each, up to 10.2 kB) from layer -2 of {tiny_models['llava-next'] / 'vision_tower'}, "
        "projector mlp2x_gelu"
    )
    assert cli_main(["info", "--model", model, "--anyres-output", "packed"]) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[0]
        .startswith(
            "features: n × 64 float16 per image (n tokens: the tiles packed by spatial_unpad) from layer -2"
        )
    )
    assert cli_main(["info", "--json", "--model", model]) == 0
    config = json.loads(capsys.readouterr().out)["config"]["model"]
    assert (config["image_aspect_ratio"], config["patch_merge_type"]) == ("anyres", "spatial_unpad")


def test_a_closed_stdout_is_no_traceback(tiny_llava):
    """`llava-features info ... | head -1`: the reader going away ends the command quietly."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "llava_features", "info", "--model", str(tiny_llava)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _progress_bar_lines(text: str) -> list[str]:
    """Lines (tqdm redraws a bar with carriage returns) that are a progress bar: ``NN%|`` or
    transformers' "Loading weights"."""
    lines = text.replace("\r", "\n").splitlines()
    return [line for line in lines if "%|" in line or "Loading weights" in line]


def test_verify_prints_our_lines_only_and_bars_with_verbose(tiny_llava):
    """A command's output is ours: transformers' "Loading weights 100%|...|" bar of the reference
    model (and any Hugging Face bar) only with -v."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    env["PYTHONPATH"] = str(REPO)

    def verify(*flags: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "llava_features", *flags, "verify", "--model", str(tiny_llava)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "verdict: identical to the reference" in proc.stdout
        return proc.stdout + proc.stderr

    assert _progress_bar_lines(verify()) == []
    bars = _progress_bar_lines(verify("-v"))
    assert any("Loading weights" in line and "100%|" in line for line in bars), bars


def test_make_tiny_model_in_process_has_no_bar_and_restores_the_switches(tmp_path, capfd):
    """``main`` called in-process (transformers already imported): "Writing model shards" is off for
    the command, and transformers' switch and the environment are as they were after it."""
    import os

    from transformers.utils import logging as hf_logging

    before = (hf_logging.is_progress_bar_enabled(), os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))
    assert cli_main(["make-tiny-model", str(tmp_path / "m")]) == 0
    out, err = capfd.readouterr()
    assert "Wrote a tiny llava checkpoint" in out
    assert _progress_bar_lines(out + err) == []
    assert (hf_logging.is_progress_bar_enabled(), os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")) == before
