"""``llava-features``: the command line, the only layer above both front doors.

Subcommands: ``encode`` (the offline Ray Data job, :mod:`pipeline.job`), ``serve`` (the online
endpoint, :mod:`deployments.launch`), ``bench``, ``demo``, ``make-tiny-model`` and ``info``.

Every option that sets a configuration value is derived from its config dataclass field
(:data:`pipeline.config.SECTIONS`): its type, its choices (``Literal`` fields) and its help (the
field's docstring) are never retyped here. Building the parser imports no torch, transformers or
Ray; each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, get_args

from pipeline.config import SECTIONS, Config, load_config
from pipeline.model.config import field_docs, literal_choices
from pipeline.model.errors import LlavaFeaturesError

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
"""Exit status of a typed error (bad config, missing checkpoint, non-empty output, ...)."""
EXIT_ERROR_BUDGET = 3
"""Exit status of a job whose failed inputs exceed ``max_error_fraction`` (everything was written)."""

BENCH_EXTERNAL: dict[str, tuple[str, str]] = {"serve": ("deployments.bench", "bench_serve")}
"""Benchmarks of the online layer, which ``pipeline.bench`` cannot import itself: name → (module, function)."""

_DEST_SEPARATOR = "."


# -- options from config fields ---------------------------------------------------------------


def _pair(value: str) -> tuple[int, int]:
    """``MIN,MAX`` (or ``N`` for N,N) → (MIN, MAX)."""
    parts = value.split(",")
    try:
        lo, hi = int(parts[0]), int(parts[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (or N), got {value!r}") from None
    return lo, hi


def _int_tuple(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _layers(value: str) -> int | tuple[int, ...]:
    """``N`` or ``N,M,...`` (several hidden layers, concatenated)."""
    layers = _int_tuple(value)
    if not layers:
        raise argparse.ArgumentTypeError(f"expected a layer index or a comma-separated list, got {value!r}")
    return layers[0] if len(layers) == 1 else layers


def _str_tuple(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _base_type(annotation: Any) -> Any:
    """``X`` of ``X | None``; any other annotation as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_setting(parser: argparse.ArgumentParser, section: str, name: str, flag: str | None = None) -> None:
    """``--flag`` for config field ``section.name``: type, choices and help from the dataclass."""
    cls = SECTIONS[section]
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    annotation = typing.get_type_hints(cls)[name]
    base = _base_type(annotation)
    default = field.default if field.default is not dataclasses.MISSING else None
    doc = field_docs(cls).get(name, "")
    kwargs: dict[str, Any] = {"dest": f"{section}{_DEST_SEPARATOR}{name}", "default": None}
    choices = literal_choices(annotation)
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif choices is not None:
        kwargs["choices"] = list(choices)
    elif base is int or base is float or base is str:
        kwargs["type"] = base
    elif base == tuple[int, int]:
        kwargs.update(type=_pair, metavar="MIN,MAX")
    elif base == tuple[int, ...]:
        kwargs.update(type=_int_tuple, metavar="N,N,...")
    elif set(get_args(base)) - {type(None)} == {int, tuple[int, ...]}:
        kwargs.update(type=_layers, metavar="N[,N...]")
    elif base == tuple[str, ...]:
        kwargs.update(type=_str_tuple, metavar="A,B,...")
    else:  # pragma: no cover - a field type the CLI does not expose
        raise TypeError(f"no command-line form for {section}.{name}: {annotation!r}")
    shown = "null" if default is None else json.dumps(default) if not isinstance(default, str) else default
    kwargs["help"] = f"{doc} [{section}.{name}; default {shown}]".replace("%", "%%")
    parser.add_argument(flag or f"--{name.replace('_', '-')}", **kwargs)


def overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` of the config options given on the command line."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, sep, name = dest.partition(_DEST_SEPARATOR)
        if sep and section in SECTIONS and value is not None:
            out.setdefault(section, {})[name] = value
    return out


MODEL_OPTIONS = ("select_layer", "select_feature", "projector_type", "image_aspect_ratio", "dtype", "device")
ENCODER_OPTIONS = ("features", "pooled", "output_dtype", "batch_size", "anyres_output")
JOB_OPTIONS = (
    "shard_size",
    "num_gpus_per_actor",
    "actors",
    "max_error_fraction",
    "tensor_format",
    "compression",
    "limit",
    "s3_endpoint",
    "read_timeout_s",
    "address",
)
INPUT_OPTIONS = ("image_column", "id_column", "keep_columns")
SERVE_OPTIONS = ("host", "port")
DECODE_OPTIONS = ("exif_transpose", "alpha", "sixteen_bit", "nvjpeg")
"""The decode guard's opt-in deviations from LLaVA's pixels (and the nvJPEG route)."""
EXIT_MISMATCH = 4
"""Exit status of ``verify`` when our features differ from the reference's."""


def _add_settings(p: argparse.ArgumentParser, **sections: tuple[str, ...]) -> None:
    """:func:`add_setting` for each ``section=(field, ...)``."""
    for section, names in sections.items():
        for name in names:
            add_setting(p, section, name)


def _add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--config", help="YAML config file (overrides defaults; see configs/)")
    src.add_argument(
        "--model",
        help="checkpoint directory or model id in the local HF cache: LLaVA, llava-hf or a bare CLIP vision model",
    )
    _add_settings(p, model=MODEL_OPTIONS)


def load_cli_config(args: argparse.Namespace) -> Config:
    """Defaults ← ``--config`` YAML ← command-line options (``--model`` sets ``model.checkpoint``)."""
    given = overrides(args)
    if getattr(args, "model", None):
        given.setdefault("model", {})["checkpoint"] = args.model
    return load_config(getattr(args, "config", None), given)


# -- handlers ---------------------------------------------------------------------------------


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from pipeline.model.tiny import make_tiny_model

    path = make_tiny_model(args.directory, args.format, seed=args.seed, weights=args.weights)
    flag = "--config" if args.format == "clip" else "--model"
    print(f"Wrote a tiny {args.format} checkpoint ({args.weights}). Use it with: {flag} {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from pipeline.config import config_to_dict
    from pipeline.encoder import describe_encoder
    from pipeline.images.native import resampler_name

    cfg = load_cli_config(args)
    desc = describe_encoder(cfg)
    card = {
        "fingerprint": desc.fingerprint,
        "encoder": desc.fields,
        "config": config_to_dict(cfg),
        "resampler": resampler_name(desc.fields["preprocess"]["resample"]),
    }
    print(json.dumps(card, indent=2))
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from pipeline.job import budget_error, dry_run, run_job

    config = load_cli_config(args)
    if args.dry_run:
        print(dry_run(config, args.input, args.output).format())
        return 0
    summary = run_job(config, args.input, args.output, resume=args.resume)
    print(summary.format())
    error = budget_error(summary, config)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR_BUDGET
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd
    import pyarrow as pa

    from pipeline.demo import run_demo
    from pipeline.reader import read_features

    summary = run_demo(Path(args.output))
    print("\n== summary ==")
    print(summary.format())
    table = read_features(args.output, status=None).table
    peek = table.select(["image_id", "status", "error_code", "width", "height"])
    print("\n== table ==")
    print(peek.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get).to_string())
    ok = read_features(args.output)
    print(f"\nfeatures of ok rows: {ok.features.shape} {ok.features.dtype}")
    print(f"first image, first token, first 6 values: {ok.features[0, 0, :6]}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.verify import DTYPE_REL_TOLERANCE, FLOAT32_REL_TOLERANCE, images_in, sample_images, verify

    config = load_cli_config(args)
    images = images_in(args.images, args.limit) if args.images else sample_images()
    report = verify(config, images)
    if args.json:
        import dataclasses

        print(json.dumps({**dataclasses.asdict(report), "passed": report.passed}, indent=2, default=str))
        return 0 if report.passed else EXIT_MISMATCH
    print(f"checkpoint layout: {report.layout}; reference: {report.reference}")
    half = report.compute_dtype != "float32"
    tolerances = f"float32 relative error <= {FLOAT32_REL_TOLERANCE:g}"
    print(
        "tolerances: " + tolerances + (f", {report.compute_dtype} <= {DTYPE_REL_TOLERANCE:g}" if half else "")
    )
    dtype_column = f"rel {report.compute_dtype}" if half else ""
    print(f"{'image':24} {'shape':>16} {'max |Δ| f32':>12} {'rel f32':>10} {dtype_column:>14}  verdict")
    for c in report.checks:
        if c.error is not None:
            print(f"{c.name[:24]:24} {'':>16} {'':>12} {'':>10} {'':>14}  FAIL: {c.error}")
            continue
        rel_half = f"{c.dtype_rel_error:.2e}" if c.dtype_rel_error is not None else ""
        shape = "x".join(map(str, c.shape))
        verdict = "ok" if c.passed else "FAIL"
        print(f"{c.name[:24]:24} {shape:>16} {c.max_abs:12.2e} {c.rel_error:10.2e} {rel_half:>14}  {verdict}")
    print(
        "verdict: " + ("identical to the reference (within the tolerances)" if report.passed else "MISMATCH")
    )
    return 0 if report.passed else EXIT_MISMATCH


def _cmd_serve(args: argparse.Namespace) -> int:
    from deployments.launch import serve_forever

    return serve_forever(load_cli_config(args))


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench.cli import main as bench_main

    return bench_main(args, external=BENCH_EXTERNAL)


# -- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from pipeline.bench.cli import add_bench_arguments
    from pipeline.model.constants import TINY_FORMATS, WEIGHT_FORMATS

    parser = argparse.ArgumentParser(
        prog="llava-features",
        description="LLaVA vision features (CLIP vision tower + projector) at scale: an offline Ray Data job "
        "and an online Ray Serve endpoint.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint (tests, demo)")
    p.add_argument("directory")
    p.add_argument("--format", choices=list(TINY_FORMATS), default="llava")
    p.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_make_tiny_model)

    p = sub.add_parser("info", help="print the resolved model, config and fingerprint")
    _add_model_args(p)
    _add_settings(p, encoder=ENCODER_OPTIONS, decode=DECODE_OPTIONS)
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("encode", help="offline job: images → Parquet feature tables (Ray Data)")
    _add_model_args(p)
    p.add_argument(
        "--input",
        required=True,
        help="local dir, glob or brace list ({00000..00099}.tar), s3:// or gs:// prefix: image files, WebDataset "
        "tar shards, .parquet/.csv manifests, or Parquet files of images (--image-column)",
    )
    p.add_argument(
        "--output", required=True, help="local dir or s3:// / gs:// prefix for the Parquet dataset"
    )
    p.add_argument("--resume", action="store_true", help="continue a job in a non-empty output")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (units, rows, shards, estimated output bytes) and exit; starts no Ray, writes nothing",
    )
    add_setting(p, "input", "format", flag="--input-format")
    _add_settings(p, input=INPUT_OPTIONS, encoder=ENCODER_OPTIONS, job=JOB_OPTIONS, decode=DECODE_OPTIONS)
    p.set_defaults(handler=_cmd_encode)

    p = sub.add_parser(
        "verify", help="compare our features with the checkpoint's reference path (transformers' or LLaVA's)"
    )
    _add_model_args(p)
    p.add_argument("--images", help="a folder of images (default: the bundled sample photos and odd shapes)")
    p.add_argument("--limit", type=int, default=16, help="at most this many images of --images")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    _add_settings(p, encoder=("anyres_output",), decode=DECODE_OPTIONS)
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("demo", help="run the offline job on the embedded default (tiny model, sample photos)")
    p.add_argument("--output", default="demo-output", help="output folder (replaced by each demo run)")
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("serve", help="online endpoint: Ray Serve HTTP application (blocks until interrupted)")
    _add_model_args(p)
    _add_settings(p, serve=SERVE_OPTIONS)
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser("bench", help="benchmarks: encoder, pipeline, preprocess, sink, plan, serve, profile")
    add_bench_arguments(p)
    p.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return int(handler(args) or 0)
    except LlavaFeaturesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
