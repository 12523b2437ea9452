"""Benchmarks, run from the command line (``fprecond bench``).

- :mod:`fprecond.bench.curvature` (``--suite curvature``): the time and peak
  memory of one curvature estimate per kind and structure, as ratios to one
  forward+backward pass of the same model measured in the same process.
- :mod:`fprecond.bench.recipes` (``--suite recipes``): the time and peak memory
  of one training step of each recipe, amortised over its refresh schedule, as
  ratios to one SGD step measured in the same process.
- :mod:`fprecond.bench.runner`: what the suites share (measuring subprocesses,
  pinning, timing against a baseline, the table, the report).
- :mod:`fprecond.bench.workloads`: the models and batches.
- :mod:`fprecond.bench.memory`: peak memory of one call (resident set on CPU,
  allocator statistics on CUDA).

Nothing is imported here, so that ``python -m fprecond.bench.curvature`` (a
measuring subprocess) runs its module exactly once.
"""
