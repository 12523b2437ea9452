"""Benchmarks, run from the command line (``fprecond bench``).

- :mod:`fprecond.bench.curvature`: the time and peak memory of one curvature
  estimate per kind and structure, as ratios to one forward+backward pass of the
  same model measured in the same process.
- :mod:`fprecond.bench.memory`: peak memory of one call (resident set on CPU,
  allocator statistics on CUDA).

Nothing is imported here, so that ``python -m fprecond.bench.curvature`` (the
measuring subprocess) runs its module exactly once.
"""
