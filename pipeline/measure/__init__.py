"""What the benchmarks of both front doors measure with (``pipeline.bench`` and ``deployments.bench``).

- :mod:`~pipeline.measure.timing`: timing a call on a device (CUDA events or ``perf_counter``, warm-up
  calls, the median of repeats), latency percentiles;
- :mod:`~pipeline.measure.environment`: what a figure was measured with (device, driver, versions);
- :mod:`~pipeline.measure.images`: synthetic photo-like images and JPEGs;
- :mod:`~pipeline.measure.session`: a local Ray, and Ray Serve, started for a benchmark and stopped after;
- :mod:`~pipeline.measure.options`: the base of every benchmark's options dataclass (checked fields).

Below both front doors (the offline job's and the endpoint's benchmarks use the same helpers), above
nothing of the product's: torch, Ray and Pillow are imported when a helper runs. Nothing is imported
here, so ``import pipeline.measure`` stays cheap.
"""
