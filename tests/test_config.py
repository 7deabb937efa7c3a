"""The configuration (``pipeline/config.py``, ``pipeline/model/config.py``): every value is checked
(type, range, choices) when it is loaded, with errors that name the YAML key; the command line's
options are derived from the same fields."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from llava_features.cli import build_parser
from llava_features.cli import main as cli_main
from pipeline.config import SECTIONS, Config, load_config
from pipeline.constants import COMPRESSIONS, FEATURE_KINDS, OUTPUT_DTYPES, TENSOR_FORMATS
from pipeline.model.config import field_docs, literal_choices
from pipeline.model.constants import ASPECT_RATIOS, COMPUTE_DTYPES, SELECT_FEATURES
from pipeline.model.errors import ConfigError


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("serve", {"port": "eighty"}, r"serve\.port: expected an integer, got 'eighty'"),
        ("serve", {"port": 70000}, r"serve\.port must be <= 65535, got 70000"),
        ("serve", {"port": True}, r"serve\.port: expected an integer, got True"),
        ("serve", {"request_timeout_s": 0}, r"serve\.request_timeout_s must be > 0"),
        (
            "serve",
            {"min_replicas": 3, "max_replicas": 2, "initial_replicas": 2},
            "min_replicas <= initial_replicas",
        ),
        ("job", {"shard_size": 0}, r"job\.shard_size must be >= 1, got 0"),
        ("job", {"max_error_fraction": 2}, r"job\.max_error_fraction must be <= 1"),
        ("job", {"actors": [3, 1]}, r"job\.actors: MIN,MAX needs MIN <= MAX, got 3,1"),
        ("job", {"actors": [0, 1]}, r"job\.actors must be >= 1"),
        ("job", {"actors": "1,2"}, r"job\.actors: expected a list of 2 values"),
        ("job", {"tensor_format": "arrow"}, r"'arrow' \(job\.tensor_format\); valid values are 'binary'"),
        ("job", {"compression": "lzma"}, r"job\.compression"),
        ("encoder", {"features": "all"}, r"Unknown features: 'all' \(encoder\.features\)"),
        ("encoder", {"output_dtype": "fp8"}, r"encoder\.output_dtype"),
        ("encoder", {"batch_size": 1.5}, r"encoder\.batch_size: expected an integer, got 1\.5"),
        ("encoder", {"batch_buckets": [8, 0]}, r"encoder\.batch_buckets must be >= 1"),
        ("decode", {"max_bytes": -1}, r"decode\.max_bytes must be >= 1"),
        ("decode", {"allowed_formats": "JPEG"}, r"decode\.allowed_formats: expected a list of strings"),
        ("model", {"select_feature": "cls"}, r"Unexpected select feature: 'cls' \(model\.select_feature\)"),
        ("model", {"dtype": "fp8"}, r"Unknown dtype: 'fp8' \(model\.dtype\)"),
        ("model", {"device": "gpu"}, r"model\.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("model", {"compile_mode": "fastest"}, r"model\.compile_mode"),
        ("model", {"overlap_chunks": 0}, r"model\.overlap_chunks must be >= 1"),
        (
            "model",
            {"select_layer": "-2"},
            r"model\.select_layer: expected an integer or a list of integers or null",
        ),
    ],
)
def test_bad_values_are_refused_at_load_naming_the_key(section, values, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {section: values})
    path = tmp_path / "bad.yaml"  # the same through a YAML file
    import yaml

    path.write_text(yaml.safe_dump({section: values}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_values_are_normalised():
    cfg = load_config(
        None,
        {
            "job": {"actors": [1, 4], "num_cpus_per_actor": 2, "max_error_fraction": 0},
            "encoder": {"batch_buckets": [32, 8, 8]},
            "decode": {"allowed_formats": ["jpeg", "png"]},
        },
    )
    assert cfg.job.actors == (1, 4) and isinstance(cfg.job.num_cpus_per_actor, float)
    assert cfg.job.max_error_fraction == 0.0 and isinstance(cfg.job.max_error_fraction, float)
    assert cfg.encoder.batch_buckets == (8, 32)
    assert cfg.decode.allowed_formats == ("JPEG", "PNG")
    assert dataclasses.replace(cfg.serve, port=9000).port == 9000
    with pytest.raises(ConfigError, match=r"serve\.port"):
        dataclasses.replace(cfg.serve, port=0)  # replace() checks too: a section is never invalid


def test_moved_keys_say_where_they_went(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size \(now encoder\.batch_size\)"):
        load_config(None, {"job": {"batch_size": 8}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="Section 'model' of .* must be a mapping"):
        load_config(bad)
    bad.write_text("model: {checkpoint: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_field_is_documented_and_typed():
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{name}.{f.name} has no one-line doc"
            assert f.name in hints
    assert set(field_docs(Config)) == set(SECTIONS)


def test_cli_options_are_derived_from_the_config_fields():
    parser = build_parser()
    encode = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["encode"]
    options = {action.dest: action for action in encode._actions}
    expected_choices = {
        "encoder.features": FEATURE_KINDS,
        "encoder.output_dtype": OUTPUT_DTYPES,
        "job.tensor_format": TENSOR_FORMATS,
        "job.compression": COMPRESSIONS,
        "model.select_feature": SELECT_FEATURES,
        "model.image_aspect_ratio": ASPECT_RATIOS,
        "model.dtype": COMPUTE_DTYPES,
    }
    for dest, choices in expected_choices.items():
        assert tuple(options[dest].choices) == choices, dest
        section, name = dest.split(".")
        assert literal_choices(typing.get_type_hints(SECTIONS[section])[name]) == choices
        assert field_docs(SECTIONS[section])[name].split(":")[0] in options[dest].help
    assert options["job.actors"].type("2,8") == (2, 8) and options["job.actors"].type("3") == (3, 3)
    args = parser.parse_args(
        ["encode", "--model", "m", "--input", "i", "--output", "o", "--batch-size", "16", "--pooled"]
    )
    assert (getattr(args, "encoder.batch_size"), getattr(args, "encoder.pooled")) == (16, True)


def test_select_layer_out_of_range_fails_at_info(tiny_llava, capsys):
    assert cli_main(["info", "--model", str(tiny_llava), "--select-layer", "99"]) == 2
    err = capsys.readouterr().err
    assert "invalid_config" in err and "select_layer=99" in err and "valid: -4..3" in err
    assert cli_main(["info", "--model", str(tiny_llava), "--select-layer", "-4"]) == 0


def test_model_paths_in_a_yaml_are_relative_to_its_folder(tmp_path, monkeypatch):
    """Relative paths in a YAML's model section are the file's, from any working directory; model
    ids (org/name) stay ids; command-line values stay relative to the working directory."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)  # not the repository root
    assert load_config(repo / "configs" / "tiny.yaml").model.checkpoint == str(repo / ".demo" / "tiny-llava")
    folder = tmp_path / "configs"
    (folder / "beside").mkdir(parents=True)
    path = folder / "c.yaml"
    path.write_text(
        "model:\n  checkpoint: ./models/llava\n  vision_tower: openai/clip-vit-large-patch14-336\n"
        "  projector_weights: beside\n"
    )
    model = load_config(path).model
    assert model.checkpoint == str(folder / "models" / "llava")  # need not exist yet
    assert model.vision_tower == "openai/clip-vit-large-patch14-336"  # a model id
    assert model.projector_weights == str(folder / "beside")  # exists beside the file
    path.write_text(
        "model:\n  checkpoint: ../up\n  vision_tower: ~/towers/clip\n  projector_weights: /abs/p\n"
    )
    model = load_config(path).model
    assert model.checkpoint == str(tmp_path / "up")
    assert model.vision_tower == str(Path.home() / "towers" / "clip")
    assert model.projector_weights == "/abs/p"
    # Overrides (the command line's --model) are used as given.
    assert load_config(path, {"model": {"checkpoint": "rel/m"}}).model.checkpoint == "rel/m"
