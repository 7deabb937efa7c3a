"""``llava-features bench {encoder,pipeline,preprocess,sink,plan,serve,profile,all}``.

``encoder``, ``pipeline`` (``--in-process``: the job's stages without Ray) and ``profile`` (a per-op
``torch.profiler`` table of ``encode_core``) live in this package's :mod:`~pipeline.bench.encoder`,
:mod:`~pipeline.bench.pipeline` and :mod:`~pipeline.bench.profile`; ``preprocess``, ``sink`` and ``plan``
dispatch (lazily) to ``pipeline.bench.preprocess.bench_preprocess``, ``pipeline.bench.sink.bench_sink`` and
``pipeline.bench.plan.bench_plan`` (``encode --dry-run`` on 10⁷ manifest rows and 10⁴ tars), passing the
options their signatures accept (plus any ``--opt KEY=VALUE``). ``serve`` measures the online
endpoint, which this package may not import: the command line (the layer above) passes it in
(``main(args, external={"serve": ("deployments.bench", "bench_serve")})``). ``all`` runs every
benchmark that can run here (the endpoint's needs Ray Serve) and records the others as skipped
(``profile`` is not part of it). ``--json PATH`` writes every result with the environment; a short
table is printed either way.

Examples::

    llava-features bench encoder --tiny --json bench.json                  # CPU smoke run
    llava-features bench encoder --config configs/llava-v1.5-7b.yaml \\
        --batch-sizes 32,128,256 --compile --variants fast --json encoder.json   # GPU
    llava-features bench pipeline --config configs/llava-v1.5-7b.yaml --images 2048
    llava-features bench pipeline --config configs/llava-v1.5-7b.yaml --in-process --images 1024
    llava-features bench profile --config configs/llava-v1.5-7b.yaml --batch-sizes 256 \\
        --table profile.txt --trace trace.json.gz
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model.constants import COMPILE_MODES, COMPUTE_DTYPES

logger = logging.getLogger(__name__)

TARGETS = (
    "encoder",
    "pipeline",
    "preprocess",
    "sink",
    "plan",
    "table",
    "serve",
    "shared-pool",
    "profile",
    "all",
)
ORDER = ("encoder", "pipeline", "preprocess", "sink", "plan", "serve")
NEEDS_ARCHITECTURE = ("encoder", "pipeline", "plan", "table", "serve", "shared-pool", "profile")
"""Benchmarks that build an encoder (``--config FILE`` or ``--tiny``); preprocess and sink need
neither (the architecture only sets their shapes: LLaVA-1.5's by default)."""
_EXTERNAL = {
    "preprocess": ("pipeline.bench.preprocess", "bench_preprocess"),
    "sink": ("pipeline.bench.sink", "bench_sink"),
    "plan": ("pipeline.bench.plan", "bench_plan"),
    "table": ("pipeline.bench.table", "bench_table"),
}
"""Benchmarks of this package dispatched by name: target → (module, function)."""


def _int_list(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def _str_list(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.replace(" ", "").split(",") if v)


def _size(value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {value!r}") from None
    return w, h


def _actors(value: str) -> tuple[int, int]:
    parts = _int_list(value)
    return (parts[0], parts[-1])


def _opt(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    return key.replace("-", "_"), parsed


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``llava-features bench`` (added to its subparser at parser build time)."""
    parser.add_argument("target", choices=TARGETS, help="which benchmark (all: every one that applies)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--config",
        help="YAML config of the model to benchmark (weights not needed: random); encoder, pipeline and "
        "serve need it or --tiny, preprocess and sink default to LLaVA-1.5's shapes",
    )
    src.add_argument(
        "--tiny", action="store_true", help="the tiny test architecture, 56 px (CPU smoke runs, tests)"
    )
    g = parser.add_argument_group("encoder")
    g.add_argument(
        "--batch-sizes", type=_int_list, help="e.g. 32,128,256 (default: that on a GPU; 8,32 tiny CPU)"
    )
    g.add_argument("--dtype", choices=COMPUTE_DTYPES, help="our compute dtype")
    g.add_argument(
        "--seed-dtype",
        choices=COMPUTE_DTYPES,
        help="the seed path's dtype (auto: float16 on a GPU, our dtype on a CPU)",
    )
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a shared CPU)"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile with static batch buckets")
    g.add_argument("--compile-mode", choices=COMPILE_MODES)
    g.add_argument(
        "--no-fast", action="store_true", help="no load-time transforms (fused QKV, folded quick_gelu)"
    )
    g.add_argument(
        "--variants",
        type=_str_list,
        help="extra variants measured in the same run: plain, fast, compiled (comma-separated)",
    )
    g.add_argument("--warmup", type=int, help="untimed calls before timing")
    g.add_argument("--repeats", type=int, help="timed calls (the median is reported)")
    g.add_argument("--ceiling-size", type=int, help="N of the N³ matmul ceiling (default 8192 GPU, 2048 CPU)")
    g.add_argument(
        "--error-images", type=int, help="images for the relative error vs the fp32 seed path (0: skip)"
    )
    g.add_argument("--host-batches", type=int, help="batches per host→host encode_pixels timing (0: skip)")
    g.add_argument(
        "--anyres-images",
        type=int,
        help="LLaVA-NeXT images of the anyres row (default 128 GPU, 8 tiny CPU; 0: skip)",
    )
    g = parser.add_argument_group("pipeline")
    g.add_argument("--images", type=int, help="JPEGs to generate (default: 8 shards on a GPU, 4 on a CPU)")
    g.add_argument("--image-size", type=_size, default=(640, 480), help="WIDTHxHEIGHT of the JPEGs (640x480)")
    g.add_argument("--batch-size", type=int, help="job batch size (default: the config's)")
    g.add_argument("--shard-size", type=int, help="job shard size")
    g.add_argument("--actors", type=_actors, help="MIN,MAX encoder actors")
    g.add_argument("--workdir", help="keep generated images/checkpoints/outputs here (default: a temp dir)")
    g.add_argument(
        "--in-process",
        action="store_true",
        help="the job's decode → encode → Parquet stages in this process, no Ray (vs encoder-only)",
    )
    g = parser.add_argument_group("profile")
    g.add_argument("--table", metavar="PATH", help="write the per-op table (sorted by device time) here")
    g.add_argument("--trace", metavar="PATH", help="write a Chrome trace here (.json, or .json.gz)")
    g = parser.add_argument_group("output")
    g.add_argument(
        "--opt",
        type=_opt,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword for the preprocess/sink/serve benchmark function (JSON value)",
    )
    g.add_argument("--json", metavar="PATH", help="write the results (and the environment) as JSON")


# -- runners ----------------------------------------------------------------------------------


def _run_encoder(args: argparse.Namespace, config: Any, workdir: Path) -> dict[str, Any]:
    from .encoder import bench_encoder, print_encoder_report

    result = bench_encoder(
        config,
        tiny=args.tiny,
        batch_sizes=args.batch_sizes,
        dtype=args.dtype,
        seed_dtype=args.seed_dtype,
        device=args.device,
        compile=args.compile,
        compile_mode=args.compile_mode,
        fast=not args.no_fast,
        variants=args.variants,
        warmup=args.warmup,
        repeats=args.repeats,
        ceiling_n=args.ceiling_size,
        error_images=args.error_images,
        host_batches=args.host_batches,
        anyres_images=args.anyres_images,
    )
    print_encoder_report(result)
    return result


def _run_pipeline(args: argparse.Namespace, config: Any, workdir: Path) -> dict[str, Any]:
    from .pipeline import bench_pipeline, print_pipeline_report

    width, height = args.image_size
    if args.in_process:
        from .pipeline import bench_pipeline_inprocess, print_inprocess_report

        result = bench_pipeline_inprocess(
            config,
            tiny=args.tiny,
            images=args.images,
            width=width,
            height=height,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            device=args.device,
            dtype=args.dtype,
            compile=True if args.compile else None,
            repeats=args.repeats,
            workdir=args.workdir,
        )
        print_inprocess_report(result)
        return result
    result = bench_pipeline(
        config,
        tiny=args.tiny,
        images=args.images,
        width=width,
        height=height,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        actors=args.actors,
        device=args.device,
        dtype=args.dtype,
        compile=True if args.compile else None,
        repeats=args.repeats,
        workdir=args.workdir,
    )
    print_pipeline_report(result)
    return result


def _run_profile(args: argparse.Namespace, config: Any, workdir: Path) -> dict[str, Any]:
    from .profile import bench_profile, print_profile_report

    result = bench_profile(
        config,
        tiny=args.tiny,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size or (args.batch_sizes[-1] if args.batch_sizes else None),
        batches=args.repeats or 3,
        warmup=args.warmup if args.warmup is not None else 2,
        variant="compiled" if args.compile else ("plain" if args.no_fast else "fast"),
        compile_mode=args.compile_mode,
        table=args.table,
        trace=args.trace,
    )
    print_profile_report(result)
    return result


def call_supported(
    fn: Callable[..., Any], candidates: dict[str, Any], extra: dict[str, Any], *positional: Any
) -> Any:
    """``fn(*positional, **kw)`` with the ``candidates`` (not None) that ``fn`` names as parameters,
    plus every ``extra`` keyword (``--opt``)."""
    params = inspect.signature(fn).parameters
    skip = len(positional)
    names = [n for i, n in enumerate(params) if i >= skip]
    kwargs = {k: v for k, v in candidates.items() if v is not None and k in names}
    kwargs.update(extra)
    return fn(*positional, **kwargs)


Runner = Callable[[argparse.Namespace, Any, Path, dict[str, tuple[str, str]]], dict[str, Any]]


def _external(name: str) -> Runner:
    def run(
        args: argparse.Namespace, config: Any, workdir: Path, table: dict[str, tuple[str, str]]
    ) -> dict[str, Any]:
        from .common import bench_arch, loadable_config

        module_name, func_name = table[name]
        fn = getattr(importlib.import_module(module_name), func_name)
        params = inspect.signature(fn).parameters
        candidates: dict[str, Any] = {
            "device": args.device,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "images": args.images,
            "batch_size": args.batch_size or (args.batch_sizes[0] if args.batch_sizes else None),
            "batch_sizes": args.batch_sizes,
            "shard_size": args.shard_size,
            "width": args.image_size[0],
            "height": args.image_size[1],
            "tiny": args.tiny,
        }
        candidates["image_size"] = tuple(args.image_size)
        # The shapes of the architecture (--config or --tiny); with neither, the benchmark's own
        # defaults (LLaVA-1.5's: 336 px, 576 x 4096 features).
        if args.tiny or config is not None:
            arch = bench_arch(config, tiny=args.tiny)
            size = arch.image_processor.get("size", arch.image_size)
            size = size.get("shortest_edge", arch.image_size) if isinstance(size, dict) else size
            candidates.update(
                tokens=arch.num_tokens,
                dim=arch.feature_dim,
                size=int(size),
                aspect_ratio=arch.image_aspect_ratio,
            )
        positional: tuple[Any, ...] = ()
        needs_config = "config" in params
        if needs_config:
            loadable = loadable_config(config, tiny=args.tiny, workdir=workdir / name)
            first = next(iter(params))
            if first == "config":
                positional = (loadable,)
            else:
                candidates["config"] = loadable
        extra = dict(args.opt or [])
        if args.target == "all":  # --opt goes to the benchmarks that take it
            extra = {k: v for k, v in extra.items() if k in params}
        result = call_supported(fn, candidates, extra, *positional)
        if not isinstance(result, dict):
            result = {"result": result}
        _print_generic(name, result)
        return result

    return run


def _print_generic(name: str, result: dict[str, Any]) -> None:
    scalars = {k: v for k, v in result.items() if isinstance(v, int | float | str | bool) or v is None}
    print(f"{name}:")
    for key, value in scalars.items():
        print(f"  {key}: {value:,.2f}" if isinstance(value, float) else f"  {key}: {value}")
    nested = {k: v for k, v in result.items() if isinstance(v, dict) and k not in ("env",)}
    for key, value in nested.items():
        print(f"  {key}: {json.dumps(value, default=str)[:400]}")


def _local(run: Callable[[argparse.Namespace, Any, Path], dict[str, Any]]) -> Runner:
    return lambda args, config, workdir, table: run(args, config, workdir)


RUNNERS: dict[str, Runner] = {
    "encoder": _local(_run_encoder),
    "pipeline": _local(_run_pipeline),
    "preprocess": _external("preprocess"),
    "sink": _external("sink"),
    "plan": _external("plan"),
    "table": _external("table"),
    "serve": _external("serve"),
    "shared-pool": _external("shared-pool"),
    "profile": _local(_run_profile),
}


def _available(name: str, table: dict[str, tuple[str, str]]) -> str | None:
    """None when benchmark ``name`` can run here, else why not (a module it needs cannot be imported)."""
    needs = {"pipeline": ("pipeline.offline", None)}.get(name) or table.get(name)
    if needs is None:
        return None if name in ("encoder", "profile") else f"no module provides the {name!r} benchmark"
    module_name, func_name = needs
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"{module_name} is not available ({exc})"
    if func_name is not None and not hasattr(module, func_name):
        return f"{module_name} has no {func_name}"
    return None


def main(args: argparse.Namespace, external: dict[str, tuple[str, str]] | None = None) -> int:
    """Run the selected benchmark(s); 0 on success, 1 when one of ``all`` failed, 2 on bad usage.

    ``external``: benchmarks of layers above this package (``{"serve": (module, function)}``), given
    by the caller.
    """
    from .common import environment, write_json

    table = {**_EXTERNAL, **(external or {})}
    targets = ORDER if args.target == "all" else (args.target,)
    config = None
    if args.config:
        from ..config import load_config

        config = load_config(args.config)
    elif not args.tiny and any(t in NEEDS_ARCHITECTURE for t in targets):
        logger.error(
            "bench %s needs --config FILE (the architecture to benchmark) or --tiny; only %s run without",
            args.target,
            " and ".join(t for t in ORDER if t not in NEEDS_ARCHITECTURE),
        )
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    status = 0
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        for name in targets:
            reason = _available(name, table)
            if reason is not None:
                if args.target != "all":
                    logger.error("bench %s: %s", name, reason)
                    return 2
                logger.warning("bench all: skipping %s: %s", name, reason)
                results[name] = {"skipped": reason}
                continue
            try:
                results[name] = RUNNERS[name](args, config, Path(tmp), table)
            except Exception as exc:
                if args.target != "all":
                    raise
                logger.exception("bench all: %s failed", name)
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                status = 1
    if args.json:
        import torch

        from ..model import resolve_device

        payload = {
            "command": f"bench {args.target}",
            "options": {k: v for k, v in vars(args).items() if k not in ("handler",)},
            "env": environment(resolve_device(args.device) if args.device else resolve_device("auto")),
            "torch_cuda": torch.cuda.is_available(),
            "results": results,
        }
        path = write_json(args.json, payload)
        print(f"wrote {path}")
    return status
