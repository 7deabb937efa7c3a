"""The offline side's benchmarks behind ``llava-features bench`` (never imported by the product's hot paths).

One module per benchmark, each with its options dataclass and its function (the command line's runner
table, :data:`llava_features.bench.RUNNERS`, calls them):

- :mod:`~pipeline.bench.encoder`: our encoder vs LLaVA's seed path vs the matmul ceiling (``bench encoder``);
- :mod:`~pipeline.bench.pipeline`: the offline job end to end, or its stages in process, vs encoder-only;
- :mod:`~pipeline.bench.preprocess`: decode + preprocessing vs ``CLIPImageProcessor``, per core;
- :mod:`~pipeline.bench.sink`: one data file's write and read, by tensor format;
- :mod:`~pipeline.bench.plan`: ``encode --dry-run`` on 10⁷ manifest rows and 10⁴ tars;
- :mod:`~pipeline.bench.table`: the feature table's log: commits, snapshot loads, resume planning;
- :mod:`~pipeline.bench.profile`: a per-op ``torch.profiler`` table of ``encode_core``.

And what they build on: :mod:`~pipeline.bench.arch` (the architecture, without weights),
:mod:`~pipeline.bench.flops` (work per image, the matmul ceiling), :mod:`~pipeline.bench.models`
(random-weight modules and loadable checkpoints), :mod:`~pipeline.bench.report` (JSON, text tables);
timing, the environment, synthetic images and Ray sessions are :mod:`pipeline.measure`'s, shared with the
endpoint's benchmarks (``deployments/bench.py``).
"""
