"""``llava-features``: the command line.

Subcommands: ``encode`` (the offline Ray Data job), ``serve`` (the online endpoint), ``bench``,
``demo``, ``make-tiny-model`` and ``info``. Heavy imports happen inside each handler.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from .model.errors import LlavaFeaturesError

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
"""Exit status of a typed error (bad config, missing checkpoint, non-empty output, ...)."""
EXIT_ERROR_BUDGET = 3
"""Exit status of a job whose failed inputs exceed ``max_error_fraction`` (everything was written)."""


def _add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--config", help="YAML config file (overrides defaults; see configs/)")
    src.add_argument(
        "--model", help="checkpoint directory or model id (LLaVA, llava-hf) or a CLIP vision model"
    )
    p.add_argument("--select-layer", type=int, help="hidden layer to take features from (e.g. -2)")
    p.add_argument(
        "--select-feature", choices=["patch", "cls_patch"], help="drop (patch) or keep (cls_patch) CLS"
    )
    p.add_argument("--projector-type", help="linear, mlp{N}x_gelu or identity")
    p.add_argument(
        "--image-aspect-ratio", choices=["pad", "square", "crop"], help="LLaVA's aspect-ratio mode"
    )
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="compute dtype")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``model`` section overrides given on the command line (None = not given)."""
    over: dict[str, Any] = {
        "select_layer": args.select_layer,
        "select_feature": args.select_feature,
        "projector_type": args.projector_type,
        "image_aspect_ratio": args.image_aspect_ratio,
        "dtype": args.dtype,
        "device": args.device,
    }
    if getattr(args, "model", None):
        from pathlib import Path

        # A directory holding a bare CLIP vision model is a tower; anything else is a checkpoint.
        cfg_path = Path(args.model) / "config.json"
        is_clip = (
            cfg_path.is_file() and json.loads(cfg_path.read_text()).get("model_type") == "clip_vision_model"
        )
        over["vision_tower" if is_clip else "checkpoint"] = args.model
    return over


def load_cli_config(args: argparse.Namespace, **sections: dict[str, Any]) -> Any:
    """Defaults ← ``--config`` YAML ← command-line overrides."""
    from .config import load_config

    return load_config(getattr(args, "config", None), {"model": model_overrides(args), **sections})


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .model.tiny import make_tiny_model

    path = make_tiny_model(args.directory, args.format, seed=args.seed, weights=args.weights)
    flag = "--config" if args.format == "clip" else "--model"
    print(f"Wrote a tiny {args.format} checkpoint ({args.weights}). Use it with: {flag} {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .config import config_to_dict
    from .encoder import describe_encoder
    from .preprocess import resampler_name

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
    from .job import budget_error, job_overrides, run_job

    config = load_cli_config(args, job=job_overrides(args))
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

    from .demo import run_demo
    from .reader import read_features

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


def _delegate(module: str, func: str = "main") -> Any:
    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-features", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint (tests, demo)")
    p.add_argument("directory")
    p.add_argument("--format", choices=["llava", "llava-hf", "clip"], default="llava")
    p.add_argument("--weights", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_make_tiny_model)

    p = sub.add_parser("info", help="print the resolved model, config and fingerprint")
    _add_model_args(p)
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("encode", help="offline job: images → Parquet feature tables (Ray Data)")
    _add_model_args(p)
    from .job import add_encode_arguments

    add_encode_arguments(p)
    p.set_defaults(handler=_cmd_encode)

    p = sub.add_parser("demo", help="run the offline job on the embedded default (tiny model, sample photos)")
    p.add_argument("--output", default="demo-output", help="output folder (replaced by each demo run)")
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("serve", help="online endpoint: Ray Serve HTTP application (blocks until interrupted)")
    _add_model_args(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    # The Serve application lives in deployments/, the layer above; it is looked up by import path,
    # as Ray Serve's own config files do.
    p.set_defaults(handler=_delegate("deployments.launch", "main"))

    p = sub.add_parser("bench", help="benchmarks: encoder, pipeline, preprocess, sink, serve")
    from .bench.cli import add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(handler=_delegate("pipeline.bench.cli", "main"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except LlavaFeaturesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
