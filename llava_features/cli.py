"""``llava-features``: the command line, the only layer above both front doors.

Subcommands: ``encode`` (the offline Ray Data job, :mod:`pipeline.offline`; what it prints:
:mod:`llava_features.render`), ``inspect`` (a feature table,
:mod:`pipeline.table.inspect`), ``serve`` (the online endpoint, :mod:`deployments.launch`), ``bench``,
``demo``, ``make-tiny-model`` and ``info``.

Every option that sets a configuration value is derived from its config dataclass field
(:data:`pipeline.config.SECTIONS`): its type, its choices (``Literal`` fields) and its help (the
field's docstring) are never retyped here. Building the parser imports no torch, transformers or
Ray; each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, get_args

from pipeline.config import SECTIONS, Config, load_config
from pipeline.memory import human_bytes
from pipeline.model.config import field_docs, literal_choices
from pipeline.model.errors import ErrorCode, LlavaFeaturesError

from .arguments import int_tuple, layers, pair, str_tuple

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
"""Exit status of a typed error before anything was written (bad config, missing checkpoint, an output
that is refused or is a file, a Ray address where nothing answers, ...)."""
EXIT_ERROR_BUDGET = 3
"""Exit status of a job whose failed inputs exceed ``max_error_fraction`` (everything was written)."""
EXIT_CLUSTER_TOO_SMALL = 5
"""Exit status of ``encode`` when the cluster cannot hold the minimum encoder actors and a decode task at
once (the preflight; nothing was written)."""
EXIT_STALLED = 6
"""Exit status of ``encode`` stopped by its watchdog (nothing written and nothing committed for
``job.stall_fail_s``): what was committed is kept, ``--resume`` continues."""
EXIT_STOPPED = 7
"""Exit status of ``encode`` stopped by a fault while writing (disk full, a read-only or failing store,
the ``--serve-app`` application gone): what was committed is kept, ``--resume`` continues."""
EXIT_INTERRUPTED = 130
"""Exit status of a command stopped by SIGINT or SIGTERM (128 + SIGINT; ``encode`` commits what is ready
first, and ``--resume`` continues)."""
EXIT_BROKEN_PIPE = 141
"""Exit status when stdout's reader went away (128 + SIGPIPE, what a shell reports for it)."""
EXIT_INCOMPLETE = 1
"""Exit status of ``inspect`` for a table that is not complete (in progress, interrupted, failed), or
whose files were removed or rewritten behind its back (reads fail)."""
EXIT_CODES: dict[ErrorCode, int] = {
    ErrorCode.INSUFFICIENT_RESOURCES: EXIT_CLUSTER_TOO_SMALL,
    ErrorCode.STALLED: EXIT_STALLED,
    ErrorCode.INTERRUPTED: EXIT_INTERRUPTED,
}
"""Exit status of a typed error by its code (others: :data:`EXIT_ERROR`, or :data:`EXIT_STOPPED` for a job
stopped while writing)."""

_DEST_SEPARATOR = "."

HF_PROGRESS_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"
"""Hugging Face's switch for its progress bars: huggingface_hub's (downloads) and, as their default,
transformers' ("Loading weights", "Writing model shards"). Set by :func:`third_party_progress_bars`."""


# -- options from config fields ---------------------------------------------------------------


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
        kwargs.update(type=pair, metavar="MIN,MAX")
    elif base == tuple[int, ...]:
        kwargs.update(type=int_tuple, metavar="N,N,...")
    elif set(get_args(base)) - {type(None)} == {int, tuple[int, ...]}:
        kwargs.update(type=layers, metavar="N[,N...]")
    elif base == tuple[str, ...]:
        kwargs.update(type=str_tuple, metavar="A,B,...")
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
    "commit_interval_s",
    "commit_max_units",
    "address",
    "serve_app",
    "num_cpus_per_actor",
    "progress_interval_s",
    "stall_warn_s",
    "stall_fail_s",
    "resource_wait_s",
)
INPUT_OPTIONS = ("image_column", "id_column", "keep_columns")
SERVE_OPTIONS = (
    "host",
    "port",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
)
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


def resolved_config(cfg: Config, resolved: Any) -> tuple[dict[str, Any], list[str]]:
    """``config_to_dict(cfg)`` with the model settings the config left null filled in from the
    checkpoint (``resolved``, a ResolvedModel) and ``encoder.output_dtype`` from the model dtype;
    and the keys so filled."""
    from pipeline.config import config_to_dict
    from pipeline.encoder import output_dtype_name

    out = config_to_dict(cfg)
    filled = []
    # The model settings a config may leave null for the checkpoint to decide: the fields the
    # config and the resolved model share.
    for key in [f.name for f in dataclasses.fields(resolved) if f.name in out["model"]]:
        value = getattr(resolved, key, None)
        if out["model"].get(key) is None and value is not None:
            out["model"][key] = list(value) if isinstance(value, tuple) else value
            filled.append(f"model.{key}")
    if out["encoder"].get("output_dtype") is None:
        out["encoder"]["output_dtype"] = output_dtype_name(cfg)
        filled.append("encoder.output_dtype")
    return out, filled


def info_lines(
    cfg: Config, resolved: Any, fields: dict[str, Any], fingerprint: str, resampler: str
) -> list[str]:
    """What ``info`` prints: the features in one line, then the fingerprint, checkpoint, preprocessing."""
    from pipeline.encoder import output_dtype_name
    from pipeline.model import resolve_device

    dtype = output_dtype_name(cfg)
    itemsize = 4 if dtype == "float32" else 2
    tokens = resolved.num_tokens
    cls = " (CLS kept)" if resolved.select_feature == "cls_patch" else ""
    layers = getattr(resolved, "select_layers", (resolved.select_layer,))
    layer = (
        f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))} (concatenated)"
    )
    source = f"from {layer} of {resolved.vision_tower}{cls}"
    tile = resolved.image_size or 1
    anyres = fields.get("anyres_output")
    tiles = (
        [1 + (w // tile) * (h // tile) for w, h in getattr(resolved, "image_grid_pinpoints", ())]
        if anyres
        else []
    )

    def shape(dim: int) -> str:
        one = tokens * dim * itemsize
        if anyres == "tiles" and tiles:
            return (
                f"(1 + tiles) × {tokens} × {dim} {dtype} per image: the base image and {min(tiles) - 1} to "
                f"{max(tiles) - 1} tiles by its grid ({human_bytes(one)} each, up to {human_bytes(one * max(tiles))})"
            )
        if anyres == "packed":
            return f"n × {dim} {dtype} per image (n tokens: the tiles packed by {resolved.patch_merge_type})"
        return f"{tokens} × {dim} {dtype} per image ({human_bytes(one)})"

    lines = []
    kind = cfg.encoder.features
    if kind in ("projected", "both"):
        lines.append(f"features: {shape(resolved.feature_dim)} {source}, projector {resolved.projector_type}")
    if kind in ("tower", "both"):
        lines.append(f"tower_features: {shape(resolved.mm_hidden_size)} {source}, before the projector")
    if cfg.encoder.pooled:
        dim = resolved.feature_dim if kind != "tower" else resolved.mm_hidden_size
        lines.append(f"pooled: {dim} float32 per image (the mean over tokens)")
    pre = fields["preprocess"]
    pad = "pad to square with the CLIP mean colour, " if pre["aspect_ratio"] == "pad" else ""
    crop = f", center crop {pre['crop_width']} × {pre['crop_height']}" if pre.get("do_center_crop") else ""
    resample = {3: "bicubic", 2: "bilinear", 1: "lanczos", 0: "nearest"}.get(
        pre.get("resample"), pre.get("resample")
    )
    lines += [
        f"fingerprint:   {fingerprint}",
        f"checkpoint:    {resolved.checkpoint or resolved.vision_tower} ({resolved.format} layout)",
        f"preprocessing: {pad}resize the shortest side to {pre['size']} ({resample}){crop} "
        f"(image_aspect_ratio {pre['aspect_ratio']})",
        f"resize route:  {resampler} (the same pixels on every route; see docs/fidelity.md)",
        f"compute:       {fields['compute_dtype']} on {resolve_device(cfg.model.device)} (model.dtype "
        f"{cfg.model.dtype}), stored as {dtype}",
    ]
    return lines


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from .reference import config_reference

    print(config_reference(), end="")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from pipeline.encoder import describe_encoder
    from pipeline.images.native import resampler_name
    from pipeline.model import resolve_model

    cfg = load_cli_config(args)
    resolved = resolve_model(cfg.model)
    desc = describe_encoder(cfg, resolved)
    resampler = resampler_name(desc.fields["preprocess"]["resample"])
    if args.json:
        config, filled = resolved_config(cfg, resolved)
        card = {
            "fingerprint": desc.fingerprint,
            "encoder": desc.fields,
            "config": config,
            "resolved_keys": filled,
            "resampler": resampler,
        }
        print(json.dumps(card, indent=2))
        return 0
    print("\n".join(info_lines(cfg, resolved, desc.fields, desc.fingerprint, resampler)))
    print("(--json: the resolved config, encoder description and fingerprint as JSON)")
    return 0


def _print_inspect(report: Any) -> None:
    """The human form of a :class:`pipeline.table.TableReport`."""
    state = report.state
    when = f" ({report.finished})" if state in ("complete", "failed") and report.finished else ""
    print(f"table:        {report.output} (Delta Lake, version {report.version})")
    print(f"state:        {state}{when}")
    for problem in report.problems:
        print(f"  - {problem}")
    budget = f"; budget {report.max_error_fraction:.2%}" if report.max_error_fraction is not None else ""
    print(
        f"rows:         {report.rows}: {report.ok} ok, {report.errors} errors ({report.error_fraction:.2%}{budget})"
    )
    for i, group in enumerate(report.error_codes):
        head = "errors:       " if i == 0 else "              "
        print(f"{head}{group.code}: {group.count}")
        for example in group.examples:
            message = example["message"]  # decode guard messages start with the input's name
            shown = message if message.startswith(example["uri"]) else f"{example['uri']}: {message}"
            print(f"                e.g. {shown}")
    for i, col in enumerate(report.columns):
        head = "columns:      " if i == 0 else "              "
        shape = " × ".join("n" if d is None else str(d) for d in col.shape)
        size = "n varies by row" if col.bytes_per_row is None else human_bytes(col.bytes_per_row)
        print(f"{head}{col.name}: {shape} {col.dtype} per row ({size}, {col.encoding})")
    planned = f" of {report.units_planned} planned" if report.units_planned is not None else ""
    print(f"units:        {report.units_committed}{planned} in the table (last plan)")
    for seg in report.segments:
        kind = "append" if seg.append else "job"
        print(
            f"segment {seg.number}:    {kind} of {seg.input} ({seg.input_kind}): {seg.units_committed} of "
            f"{seg.units_planned} units, {seg.rows} rows, {seg.state}"
        )
    for run in report.runs:
        live = ", writing now" if run.live else ""
        print(
            f"run {run.run}: {run.host} pid {run.pid}, {run.first} → {run.last}: {run.commits} commit(s), "
            f"{run.units} units, {run.rows} rows{live}"
        )
    extra = []
    if report.in_flight_files:
        extra.append(f"{len(report.in_flight_files)} in flight")
    if report.orphan_files:
        extra.append(f"{len(report.orphan_files)} orphaned by stopped runs")
    print(
        f"files:        {report.data_files} data files, {human_bytes(report.data_bytes)}"
        + (f" (not in the table: {', '.join(extra)})" if extra else "")
    )
    print(f"fingerprint:  {report.fingerprint}")
    model = report.encoder.get("model") or {}
    pre = report.encoder.get("preprocess") or {}
    print(
        f"model:        {report.model} ({model.get('format')}): layer {model.get('select_layer')} "
        f"({model.get('select_feature')}), projector {model.get('projector_type')}, "
        f"{pre.get('crop_height')} px {pre.get('aspect_ratio')}"
    )
    options = ", ".join(f"{k} {json.dumps(v)}" for k, v in report.options.items())
    print(f"options:      {options}")
    print(f"job:          {report.job}, created {report.created}")
    if report.data_files:
        print(f"read it:      from pipeline import read_features; read_features({report.output!r})")
        print(
            f"              DuckDB: import deltalake, duckdb; ds = deltalake.DeltaTable({report.output!r})"
            ".to_pyarrow_dataset(); duckdb.sql('select status, error_code, count(*) from ds group by all')"
        )
    print("(--json: all of it as JSON)")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.table import inspect_table

    report = inspect_table(args.output, s3_endpoint=getattr(args, "job.s3_endpoint", None))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _print_inspect(report)
    damaged = report.missing_files or report.changed_files
    return 0 if report.state == "complete" and not damaged else EXIT_INCOMPLETE


def _cmd_encode(args: argparse.Namespace) -> int:
    from pipeline.model.errors import JobStoppedError
    from pipeline.offline import budget_error, dry_run, run_job

    from .render import ProgressPrinter, dry_run_text, summary_text

    config = load_cli_config(args)
    mode = "resume" if args.resume else "append" if args.append else "create"
    if args.dry_run:
        print(dry_run_text(dry_run(config, args.input, args.output, mode=mode)))
        return 0
    progress = ProgressPrinter(sys.stderr, interval_s=config.job.progress_interval_s)
    try:
        summary = run_job(config, args.input, args.output, mode=mode, progress=progress)
    except JobStoppedError as exc:  # what the run did, then why it stopped (committed units are kept)
        progress.close()
        if exc.summary is not None:
            print(summary_text(exc.summary))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, EXIT_STOPPED)
    finally:
        progress.close()
    print(summary_text(summary))
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
    from pipeline.table import read_features

    from .render import summary_text

    summary = run_demo(Path(args.output))
    print("\n== summary ==")
    print(summary_text(summary))
    table = read_features(args.output, status=None).table
    peek = table.select(["image_id", "status", "error_code", "width", "height"])
    print("\n== table ==")
    print(peek.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get).to_string())
    ok = read_features(args.output)
    print(f"\nfeatures of ok rows: {ok.features.shape} {ok.features.dtype}")
    print(f"first image, first token, first 6 values: {ok.features[0, 0, :6]}")
    prog, python = _commands()
    out = args.output
    print("\n== next ==")
    print(f"{prog} inspect {out}          # rows, errors by code, columns, files, completeness, config")
    print(
        f"{python} -c \"from pipeline import read_features; fs = read_features('{out}'); "
        'print(fs.image_ids[:3], fs.features.shape)"'
    )
    print(
        f"{python} -c \"import ray; print(ray.data.read_delta('{out}').select_columns(['image_id', 'status'])"
        '.take(3))"'
    )
    print(
        f"{python} -c \"import deltalake, duckdb; ds = deltalake.DeltaTable('{out}').to_pyarrow_dataset(); "
        "print(duckdb.sql('select status, error_code, count(*) from ds group by all'))\""
    )
    return 0


def _commands() -> tuple[str, str]:
    """How to call ``llava-features`` and the Python next to it, as this process was started
    (``.venv/bin/llava-features`` under ``make demo``, where neither is on PATH)."""
    from pathlib import Path

    program = Path(sys.argv[0])
    if program.name != "llava-features" or program.parent == Path():
        return "llava-features", "python"
    python = program.with_name("python")
    return str(program), str(python) if python.exists() else "python"


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
    from .bench import main as bench_main

    return bench_main(args)


# -- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from pipeline.model.constants import TINY_FORMATS, WEIGHT_FORMATS

    from .bench import RUNNERS, add_bench_arguments

    parser = argparse.ArgumentParser(
        prog="llava-features",
        description="LLaVA vision features (CLIP vision tower + projector) at scale: an offline Ray Data job "
        "and an online Ray Serve endpoint.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and third-party progress bars (transformers')",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint (tests, demo)")
    p.add_argument("directory")
    p.add_argument("--format", choices=list(TINY_FORMATS), default="llava")
    p.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_make_tiny_model)

    p = sub.add_parser(
        "config-reference",
        help="print the configuration reference (every section and key; docs/configuration.md)",
    )
    p.set_defaults(handler=_cmd_config_reference)

    p = sub.add_parser("info", help="what the features will be: shapes, layer, projector, fingerprint")
    _add_model_args(p)
    _add_settings(p, encoder=ENCODER_OPTIONS, decode=DECODE_OPTIONS)
    p.add_argument("--json", action="store_true", help="the resolved config, encoder and fingerprint as JSON")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser(
        "inspect", help="look inside an output: rows, errors by code, columns, files, completeness, config"
    )
    p.add_argument("output", help="the job's output: local folder or s3:// / gs:// prefix")
    p.add_argument("--json", action="store_true", help="the report as JSON (for scripts)")
    add_setting(p, "job", "s3_endpoint")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("encode", help="offline job: images → a feature table (Ray Data → Delta Lake)")
    _add_model_args(p)
    p.add_argument(
        "--input",
        required=True,
        help="local dir, glob or brace list ({00000..00099}.tar), s3:// or gs:// prefix: image files, WebDataset "
        "tar shards, .parquet/.csv manifests, or Parquet files of images (--image-column)",
    )
    p.add_argument(
        "--output", required=True, help="local dir or s3:// / gs:// prefix of the feature table (Delta Lake)"
    )
    existing = p.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the table's job (the same input and options): encode only the units it does not hold",
    )
    existing.add_argument(
        "--append",
        action="store_true",
        help="add the inputs a complete table does not hold yet (by image_id), with the same encoder and schema",
    )
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

    p = sub.add_parser("bench", help=f"benchmarks: {', '.join(RUNNERS)}")
    add_bench_arguments(p)
    p.set_defaults(handler=_cmd_bench)
    return parser


@contextlib.contextmanager
def third_party_progress_bars(shown: bool) -> Iterator[None]:
    """Hugging Face's progress bars off for a command unless ``shown`` (``-v``): a command prints our
    lines only, not a "Loading weights 100%|...|" bar between them. A user's own
    ``HF_HUB_DISABLE_PROGRESS_BARS`` wins either way.

    The CLI is the place for it: the libraries only say how (no module of ours switches them at
    import). The environment variable is read by huggingface_hub when imported and gives transformers
    its default (both imported by the handlers, after this), and the processes started from here (a
    local Ray cluster's workers) inherit it. When transformers is already imported (``main`` called
    in-process), its own switch is turned off for the command too (the model package's scope, which
    restores it); the variable is removed after the command.
    """
    if shown or HF_PROGRESS_BARS_ENV in os.environ:
        yield
        return
    os.environ[HF_PROGRESS_BARS_ENV] = "1"
    try:
        with contextlib.ExitStack() as scope:
            if "transformers" in sys.modules:  # it read the variable at its import: too late for this
                from pipeline.model.tower import quiet_progress_bars

                scope.enter_context(quiet_progress_bars())
            yield
    finally:
        os.environ.pop(HF_PROGRESS_BARS_ENV, None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        with third_party_progress_bars(shown=args.verbose):
            status = int(handler(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return status
    except LlavaFeaturesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, EXIT_ERROR)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor one at exit's flush
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
