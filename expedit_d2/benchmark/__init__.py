"""The benchmarks' logic, which ``tools/benchmark_model.py`` and ``tools/benchmark_backbone.py``
drive from the command line (each tool's docstring says what it measures and reports).

* :mod:`expedit_d2.benchmark.model` -- whole-model latency of base vs expedited settings,
  by parts (backbone, head parts, pre- and post-processing);
* :mod:`expedit_d2.benchmark.backbone` -- base vs reduced backbone on the same weights:
  GMACs, latency, memory, operator share, output cosines;
* :mod:`expedit_d2.benchmark.cases` -- the backbone benchmark's built-in cases and the
  settings of each method;
* :mod:`expedit_d2.benchmark.pool` -- ``--pool``: one latency ratio from several earlier runs'
  rounds, for either benchmark.

The measuring itself (interleaved timing, per-round ratios and their interval, page faults,
peak memory in a fresh process, atomic reports) is :mod:`expedit_d2.measure`'s, shared with
the sweep (:mod:`expedit_d2.sweep`). The submodules are imported by name: this package
imports none of them.
"""
