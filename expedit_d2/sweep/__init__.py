"""Accuracy versus GMACs and speed over token-reduction settings: the sweep every project uses.

    python -m expedit_d2.sweep --config-file projects/DPT/configs/dpt_hybrid_nyuv2.yaml \\
        --input-size 480 640 --output-dir output/sweep_dpt \\
        --grid "MODEL.EXPEDIT.CLUSTERING_LOCATION=[2, 4, 6]" \\
        --grid "MODEL.EXPEDIT.NUM_CLUSTERS=[[14, 14], [16, 16], [24, 24]]" MODEL.WEIGHTS dpt_hybrid_nyu.pt
    python -m expedit_d2.sweep --sweep-file configs/sweeps/dpt_hybrid_nyuv2.yaml MODEL.WEIGHTS ...
    python -m expedit_d2.sweep --sweep-file configs/sweeps/dpt_hybrid_nyuv2_methods.yaml MODEL.WEIGHTS ...

A sweep is a base config (+ weights), the project that owns it (the folder of its
``train_net.py``, found from the config's path or given with ``--project``), an input size,
and a grid: the product of ``KEY=[values]`` lists plus any explicit points. The
un-reduced baseline is always point 0. For every point:

* backbone and whole-model GMACs (fvcore multiply-adds, one image of the stated size; GFLOPs
  in the two-flops-per-multiply-add convention are twice that),
* latency (median of ``--repeats`` after warm-up, synchronised, batch 1), FPS, and the speed-up
  over the baseline timed interleaved with it in the same process,
* peak memory of one forward (on CPU in a fresh process, see :mod:`expedit_d2.measure`),
* the task's metrics from the project's own evaluators: ``train_net.py --eval-only`` runs in a
  subprocess (Detectron2's ``launch`` on ``--num-gpus``) and leaves ``eval_results.json``;
  the primary metric and its direction come from the project's ``SWEEP`` declaration
  (:class:`expedit_d2.sweep.protocol.SweepProtocol`) unless ``--metric`` / ``--metric-mode`` say.

Methods: ``MODEL.TOKEN_REDUCTION.METHOD`` (``expedit``, ``tome``, ``evit``, ``pool``,
``none``) is a key like any other; a point without it is an expedit point. Since each
method has its own keys, methods are compared with explicit ``points`` (any mix of methods)
and/or grids; every row records its method, the table has a method column and the best
setting of each method within the budget, and the plot one series and Pareto front per
method.

Every grid value is checked before anything is evaluated: unknown config keys, values the
backbone rejects (alpha beyond the depth), and cluster grids with more clusters than the token grid has tokens
at the stated input size (a shape-only forward on the meta device). So are the weights: the baseline
model loads ``MODEL.WEIGHTS`` as ``--eval-only`` does (:func:`expedit_d2.checkpoint.load_weights`),
so no weights, a missing or unreadable file, or a checkpoint of another model stop the sweep with
an error naming the file and the first offending keys; ``--allow-partial-weights`` (passed on to
every point's evaluation) accepts a partial load. A point whose evaluation fails reports the
exception its ``train_net.py`` raised.

Results: one :class:`Row` per point, appended atomically to ``results.jsonl`` and ``results.csv``
(``results.shard-I-of-N.*`` with ``--shard I/N``); a rerun skips the points already there, so a
killed sweep resumes without duplicates. ``table.md`` (deltas vs. the baseline) and
``pareto.png`` (metric vs. backbone GMACs and vs. measured speed-up, baseline and Pareto
fronts marked) are rebuilt from all rows after each run; ``--merge`` joins the shards' rows
into ``results.*``. ``--budget-gmacs`` / ``--budget-ms`` report the best setting (overall
and of each method) within a budget.

Config translation is :mod:`expedit_d2.reduction.config`'s: official Expedit Swin keys are
accepted as grid keys (``MODEL.SWIN.CLUSTERING_LOCATION``,
``MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS`` ...) and mapped to ``MODEL.EXPEDIT.*``; a
base config on a plain backbone or on ``D2HourglassSwinTransformer`` is rewritten onto the
wrapper backbone for reduced points.

Modules: :mod:`.spec` (spec, points, labels, parsing), :mod:`.points` (point configs and
validation), :mod:`.measure` (evaluation, GMACs, latency, memory of one point),
:mod:`.store` (rows, results files, merge, lock), :mod:`.report` (table, plot, budgets),
:mod:`.run` (the run), :mod:`.cli` (the command line).
"""
from .cli import build_parser, cli, main, parse_shard, spec_from_args
from .measure import child_exception, evaluate_point, measure_memory, memory_child
from .points import build_point_cfg, point_opts, validate_points
from .report import (best_per_method, best_within_budget, pareto_front, plot_pareto, table_markdown,
                     write_report)
from .run import run_sweep
from .spec import (BASELINE, DEFAULT_METHOD, METHOD_KEY, Point, SweepError, SweepSpec, expand_points, find_project,
                   load_sweep_file, parse_grid, parse_point, point_method)
from .store import (CSV_FIELDS, RESULTS, Row, append_row, merge, output_lock, read_rows, rows_from_csv,
                    rows_from_jsonl, rows_to_csv, rows_to_jsonl)

__all__ = [
    # the spec and its points
    "SweepSpec", "Point", "SweepError", "expand_points", "find_project", "point_method", "load_sweep_file",
    "parse_grid", "parse_point", "METHOD_KEY", "DEFAULT_METHOD", "BASELINE",
    # point configs
    "point_opts", "build_point_cfg", "validate_points",
    # measuring a point
    "evaluate_point", "child_exception", "measure_memory", "memory_child",
    # the run and its results
    "run_sweep", "Row", "read_rows", "append_row", "merge", "output_lock", "rows_from_jsonl", "rows_to_jsonl",
    "rows_from_csv", "rows_to_csv", "CSV_FIELDS", "RESULTS",
    # the report
    "write_report", "table_markdown", "plot_pareto", "best_within_budget", "best_per_method", "pareto_front",
    # the command line
    "main", "cli", "build_parser", "spec_from_args", "parse_shard",
]
