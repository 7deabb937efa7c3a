"""``llava-features bench TARGET``: every benchmark behind one table of runners, :data:`RUNNERS`.

A runner builds its benchmark's options dataclass from the command line's flags and ``--opt KEY=VALUE``
(a JSON value, checked against the dataclass's field: errors name the key), calls the benchmark function
and prints its report. :func:`main` loads the config, runs the selected runners (``all``: those marked
for it; a benchmark whose dependencies are not installed is recorded as skipped) and writes ``--json``.

This is the only layer that sees both front doors: the offline job's benchmarks (:mod:`pipeline.bench`)
and the endpoint's (:mod:`deployments.bench`, which gets the job's ``run_job`` from here for the shared
pool) are called from here. Building the parser imports neither; a runner imports its benchmark when it
runs.

Examples::

    llava-features bench encoder --tiny --json bench.json                  # CPU smoke run
    llava-features bench encoder --config configs/llava-v1.5-7b.yaml \\
        --batch-sizes 32,128,256 --compile --variants fast --json encoder.json   # GPU
    llava-features bench pipeline --config configs/llava-v1.5-7b.yaml --in-process --images 1024
    llava-features bench serve --tiny --opt requests=500 --opt concurrency=16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import Config, load_config
from pipeline.model.constants import COMPILE_MODES, COMPUTE_DTYPES
from pipeline.model.errors import ConfigError

from .arguments import int_tuple, key_value, pair, str_tuple, width_height

logger = logging.getLogger(__name__)

Options = TypeVar("Options")


@dataclass
class BenchCall:
    """One benchmark's run: the command line, the config, a work folder; what its runner builds from them."""

    name: str
    args: argparse.Namespace
    config: Config | None
    """``--config``'s (None with ``--tiny`` or neither)."""
    workdir: Path
    """A temporary folder of the whole command (removed at its end)."""
    every: bool
    """Run as part of ``bench all``: ``--opt`` keys this benchmark does not take are left out for it."""
    options_used: Any = None
    """The options the runner built (recorded in ``--json``)."""
    keys_taken: set[str] = field(default_factory=set)
    """The ``--opt`` keys this benchmark took."""

    def options(self, cls: type[Options], **flags: Any) -> Options:
        """``cls`` from the flags that were given (None: the field's default), then ``--opt KEY=VALUE``."""
        names = [f.name for f in dataclasses.fields(cls)]
        given = {k: v for k, v in flags.items() if v is not None}
        for key, value in self.args.opt:
            if key not in names:
                if self.every:
                    continue
                raise ConfigError(
                    f"bench {self.name}: --opt {key}: no such option (options: {', '.join(names)})"
                )
            given[key] = value
            self.keys_taken.add(key)
        self.options_used = cls(**given)
        return self.options_used

    def loadable_config(self) -> Config:
        """The config with a model that loads: ``--config``'s when it is on disk, else a random-weight
        checkpoint of its architecture; ``--tiny``: the tiny checkpoint (written under the work folder)."""
        from pipeline.bench.models import loadable_config

        return loadable_config(self.config, tiny=self.args.tiny, workdir=self.workdir / self.name)

    def shapes(self) -> dict[str, Any]:
        """The architecture's feature shape and image size (``tokens``, ``dim``, ``size``, ``aspect_ratio``)
        with ``--config`` or ``--tiny``; empty without either (the benchmark's defaults: LLaVA-1.5's)."""
        if not self.args.tiny and self.config is None:
            return {}
        from pipeline.bench.arch import bench_arch

        arch = bench_arch(self.config, tiny=self.args.tiny)
        size = arch.image_processor.get("size", arch.image_size)
        size = size.get("shortest_edge", arch.image_size) if isinstance(size, dict) else size
        return {
            "tokens": arch.num_tokens,
            "dim": arch.feature_dim,
            "size": int(size),
            "aspect_ratio": arch.image_aspect_ratio,
        }


# -- runners: flags → options → benchmark → report ------------------------------------------------


def _run_encoder(call: BenchCall) -> dict[str, Any]:
    from pipeline.bench.encoder import EncoderOptions, bench_encoder, format_encoder_report

    a = call.args
    options = call.options(
        EncoderOptions,
        tiny=a.tiny,
        batch_sizes=a.batch_sizes,
        dtype=a.dtype,
        seed_dtype=a.seed_dtype,
        device=a.device,
        compile=a.compile,
        compile_mode=a.compile_mode,
        fast=not a.no_fast,
        variants=a.variants,
        warmup=a.warmup,
        repeats=a.repeats,
        ceiling_n=a.ceiling_size,
        error_images=a.error_images,
        host_batches=a.host_batches,
        anyres_images=a.anyres_images,
    )
    result = bench_encoder(call.config, options)
    print(format_encoder_report(result))
    return result


def _run_pipeline(call: BenchCall) -> dict[str, Any]:
    from pipeline.bench.pipeline import (
        PipelineOptions,
        bench_pipeline,
        bench_pipeline_inprocess,
        format_inprocess_report,
        format_pipeline_report,
    )

    a = call.args
    options = call.options(
        PipelineOptions,
        tiny=a.tiny,
        in_process=a.in_process,
        images=a.images,
        image_size=a.image_size,
        batch_size=a.batch_size,
        shard_size=a.shard_size,
        actors=a.actors,
        device=a.device,
        dtype=a.dtype,
        compile=True if a.compile else None,
        repeats=a.repeats,
        workdir=a.workdir,
    )
    if options.in_process:
        result = bench_pipeline_inprocess(call.config, options)
        print(format_inprocess_report(result))
    else:
        result = bench_pipeline(call.config, options)
        print(format_pipeline_report(result))
    return result


def _run_preprocess(call: BenchCall) -> dict[str, Any]:
    from pipeline.bench.preprocess import PreprocessOptions, bench_preprocess

    a, shapes = call.args, call.shapes()
    options = call.options(
        PreprocessOptions,
        size=shapes.get("size"),
        aspect_ratio=shapes.get("aspect_ratio"),
        image_size=a.image_size,
        batch_size=a.batch_size or (a.batch_sizes[0] if a.batch_sizes else None),
    )
    return _print_result(call.name, bench_preprocess(options))


def _run_sink(call: BenchCall) -> dict[str, Any]:
    from pipeline.bench.sink import SinkOptions, bench_sink

    shapes = call.shapes()
    options = call.options(
        SinkOptions, tokens=shapes.get("tokens"), dim=shapes.get("dim"), repeats=call.args.repeats
    )
    return _print_result(call.name, bench_sink(options))


def _run_plan(call: BenchCall) -> dict[str, Any]:
    from pipeline.bench.plan import PlanOptions, bench_plan

    options = call.options(PlanOptions)
    return _print_result(call.name, bench_plan(call.loadable_config(), options))


def _run_table(call: BenchCall) -> dict[str, Any]:
    from pipeline.bench.table import TableOptions, bench_table

    options = call.options(TableOptions)
    return _print_result(call.name, bench_table(call.loadable_config(), options))


def _run_serve(call: BenchCall) -> dict[str, Any]:
    from deployments.bench import ServeOptions, bench_serve

    a = call.args
    options = call.options(ServeOptions, image_size=a.image_size, warmup=a.warmup)
    return _print_result(call.name, bench_serve(call.loadable_config(), options))


def _run_shared_pool(call: BenchCall) -> dict[str, Any]:
    from deployments.bench import SharedPoolOptions, bench_shared_pool
    from pipeline.offline import run_job

    a = call.args
    options = call.options(
        SharedPoolOptions,
        images=a.images,
        shard_size=a.shard_size,
        image_size=a.image_size,
        warmup=a.warmup,
    )
    # The job's own entry point, passed in: the endpoint's package never imports the offline job.
    return _print_result(call.name, bench_shared_pool(call.loadable_config(), options, run_job=run_job))


def _run_profile(call: BenchCall) -> dict[str, Any]:
    from pipeline.bench.profile import ProfileOptions, bench_profile, format_profile_report

    a = call.args
    options = call.options(
        ProfileOptions,
        tiny=a.tiny,
        device=a.device,
        dtype=a.dtype,
        batch_size=a.batch_size or (a.batch_sizes[-1] if a.batch_sizes else None),
        batches=a.repeats,
        warmup=a.warmup,
        variant="compiled" if a.compile else ("plain" if a.no_fast else "fast"),
        compile_mode=a.compile_mode,
        table=a.table,
        trace=a.trace,
    )
    result = bench_profile(call.config, options)
    print(format_profile_report(result))
    return result


def _print_result(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Print a benchmark's figures (its scalars, then its nested results in short); returns ``result``."""
    print(f"{name}:")
    for key, value in result.items():
        if isinstance(value, float):
            print(f"  {key}: {value:,.2f}")
        elif isinstance(value, int | str | bool) or value is None:
            print(f"  {key}: {value}")
        elif isinstance(value, dict) and key != "env":
            print(f"  {key}: {json.dumps(value, default=str)[:400]}")
    return result


@dataclass(frozen=True)
class Runner:
    """How ``bench`` runs one benchmark."""

    run: Callable[[BenchCall], dict[str, Any]]
    """Builds the options from the command line, runs the benchmark, prints its report; returns its result."""
    needs_architecture: bool
    """It builds an encoder or a job: ``--config FILE`` or ``--tiny`` is required."""
    in_all: bool
    """``bench all`` runs it."""
    summary: str
    """What it measures, in a few words."""


RUNNERS: dict[str, Runner] = {
    "encoder": Runner(
        _run_encoder,
        needs_architecture=True,
        in_all=True,
        summary="our encoder vs the seed path vs the matmul ceiling",
    ),
    "pipeline": Runner(
        _run_pipeline,
        needs_architecture=True,
        in_all=True,
        summary="the offline job end to end vs encoder-only",
    ),
    "preprocess": Runner(
        _run_preprocess,
        needs_architecture=False,
        in_all=True,
        summary="decode + preprocessing vs CLIPImageProcessor",
    ),
    "sink": Runner(
        _run_sink,
        needs_architecture=False,
        in_all=True,
        summary="a data file's write and read MB/s by tensor format",
    ),
    "plan": Runner(
        _run_plan,
        needs_architecture=True,
        in_all=True,
        summary="encode --dry-run on 10⁷ manifest rows and 10⁴ tars",
    ),
    "table": Runner(
        _run_table,
        needs_architecture=True,
        in_all=False,
        summary="the Delta log: commits, snapshot loads, resume planning",
    ),
    "serve": Runner(
        _run_serve,
        needs_architecture=True,
        in_all=True,
        summary="the endpoint over HTTP vs the encoder in-process",
    ),
    "shared-pool": Runner(
        _run_shared_pool,
        needs_architecture=True,
        in_all=False,
        summary="the job through the endpoint's replicas",
    ),
    "profile": Runner(
        _run_profile,
        needs_architecture=True,
        in_all=False,
        summary="a per-op torch.profiler table of encode_core",
    ),
}
"""Every benchmark of ``llava-features bench``, by name, in the order ``all`` runs them."""
TARGETS = (*RUNNERS, "all")


# -- the command line -----------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``llava-features bench`` (added to its subparser at parser build time)."""
    parser.add_argument(
        "target",
        choices=TARGETS,
        help="; ".join(f"{name}: {r.summary}" for name, r in RUNNERS.items())
        + "; all: every one marked for it ("
        + ", ".join(name for name, r in RUNNERS.items() if r.in_all)
        + ")",
    )
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--config",
        help="YAML config of the model to benchmark (weights not needed: random); "
        + ", ".join(name for name, r in RUNNERS.items() if r.needs_architecture)
        + " need it or --tiny; preprocess and sink default to LLaVA-1.5's shapes",
    )
    src.add_argument(
        "--tiny", action="store_true", help="the tiny test architecture, 56 px (CPU smoke runs, tests)"
    )
    g = parser.add_argument_group("encoder")
    g.add_argument(
        "--batch-sizes", type=int_tuple, help="e.g. 32,128,256 (default: that on a GPU; 8,32 tiny CPU)"
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
        type=str_tuple,
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
    g.add_argument(
        "--image-size", type=width_height, default=(640, 480), help="WIDTHxHEIGHT of the JPEGs (640x480)"
    )
    g.add_argument("--batch-size", type=int, help="job batch size (default: the config's)")
    g.add_argument("--shard-size", type=int, help="job shard size")
    g.add_argument("--actors", type=pair, help="MIN,MAX encoder actors")
    g.add_argument("--workdir", help="keep generated images/checkpoints/outputs here (default: a temp dir)")
    g.add_argument(
        "--in-process",
        action="store_true",
        help="the job's decode → encode → data file stages in this process, no Ray (vs encoder-only)",
    )
    g = parser.add_argument_group("profile")
    g.add_argument("--table", metavar="PATH", help="write the per-op table (sorted by device time) here")
    g.add_argument("--trace", metavar="PATH", help="write a Chrome trace here (.json, or .json.gz)")
    g = parser.add_argument_group("output")
    g.add_argument(
        "--opt",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a field of the benchmark's options dataclass (a JSON value: --opt rows=4, "
        "--opt 'sizes=[10000]'); an unknown key or a value of the wrong type is an error naming it",
    )
    g.add_argument("--json", metavar="PATH", help="write the results (and the environment) as JSON")


def main(args: argparse.Namespace) -> int:
    """Run the selected benchmark(s); 0 on success, 1 when one of ``all`` failed, 2 on bad usage."""
    from pipeline.bench.report import write_json

    every = args.target == "all"
    names = [name for name, r in RUNNERS.items() if r.in_all] if every else [args.target]
    config = load_config(args.config) if args.config else None
    if config is None and not args.tiny and any(RUNNERS[n].needs_architecture for n in names):
        logger.error(
            "bench %s needs --config FILE (the architecture to benchmark) or --tiny; only %s run without",
            args.target,
            " and ".join(name for name, r in RUNNERS.items() if not r.needs_architecture),
        )
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    used: dict[str, Any] = {}
    taken: set[str] = set()
    status = 0
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as tmp:
        for name in names:
            call = BenchCall(name=name, args=args, config=config, workdir=Path(tmp), every=every)
            try:
                results[name] = RUNNERS[name].run(call)
            except ModuleNotFoundError as exc:  # a dependency of this benchmark is not installed
                if not every:
                    logger.error("bench %s: %s", name, exc)
                    return 2
                logger.warning("bench all: skipping %s: %s", name, exc)
                results[name] = {"skipped": str(exc)}
            except Exception as exc:
                if not every:
                    raise
                logger.exception("bench all: %s failed", name)
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                status = 1
            if call.options_used is not None:
                used[name] = dataclasses.asdict(call.options_used)
            taken |= call.keys_taken
    unused = sorted({key for key, _ in args.opt} - taken)
    if unused:
        logger.warning("bench %s: --opt %s: taken by no benchmark that ran", args.target, ", ".join(unused))
    if args.json:
        import torch

        from pipeline.measure.environment import environment
        from pipeline.model import resolve_device

        payload = {
            "command": f"bench {args.target}",
            "options": {k: v for k, v in vars(args).items() if k not in ("handler",)},
            "bench_options": used,
            "env": environment(resolve_device(args.device or "auto")),
            "torch_cuda": torch.cuda.is_available(),
            "results": results,
        }
        path = write_json(args.json, payload)
        print(f"wrote {path}")
    return status
