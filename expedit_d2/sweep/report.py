"""The report, rebuilt from every row: ``table.md`` (deltas vs. the baseline, a method
column, the best setting of each method within the budget) and ``pareto.png`` (the metric
vs. backbone GMACs and vs. the measured speed-up: one series and Pareto front per method,
the baseline starred).

Every ratio in the table can be checked against the numbers printed beside it: a point's
speed-up is the baseline's time measured in the same run as the point (interleaved with it,
its own column) over the point's time, both printed in the row. The baseline is timed again
beside every point, so the table also says how much that time varied from run to run, and
which speed-ups lie within that spread (and so cannot be told from noise).
"""
from __future__ import annotations

from pathlib import Path

from ..fileio import atomic_write
from .spec import BASELINE, DEFAULT_METHOD, SweepError
from .store import Row, read_rows

__all__ = ["best_within_budget", "best_per_method", "methods_of", "pareto_front", "table_markdown",
           "plot_pareto", "write_report", "same_run_baseline_ms", "timing_spread", "within_spread"]

# x axes of the plot: (row field, axis label)
_AXES = (("backbone_gmacs", "backbone GMACs"),
         ("speedup_vs_baseline", "speed-up: baseline ms (same run) / point ms, measured"))
# cost fields where higher is better
_HIGHER_IS_BETTER = ("fps", "speedup_vs_baseline")


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def _speedup(r: Row) -> str:
    return "-" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x"


def _pct(v, base):
    if v is None or not base:
        return "-"
    return f"{100.0 * (v - base) / base:+.1f}%"


def _lower_metric(rows: list[Row]) -> bool:
    return bool(rows) and rows[0].metric_mode == "min"


def methods_of(rows: list[Row]) -> list[str]:
    """The methods of the non-baseline rows: expedit first, then in order of appearance."""
    seen = list(dict.fromkeys(r.method for r in rows if not r.baseline))
    return sorted(seen, key=lambda m: m != DEFAULT_METHOD)


def best_within_budget(rows: list[Row], budget_gmacs=None, budget_ms=None, method: str | None = None):
    """The row with the best primary metric whose backbone GMACs / latency fit the budget
    (among ``method``'s rows when given), or None."""
    ok = [r for r in rows if r.metric_value is not None and (method is None or r.method == method)
          and (budget_gmacs is None or (r.backbone_gmacs is not None and r.backbone_gmacs <= budget_gmacs))
          and (budget_ms is None or (r.latency_ms is not None and r.latency_ms <= budget_ms))]
    if not ok:
        return None
    lower = _lower_metric(rows)
    return min(ok, key=lambda r: r.metric_value if lower else -r.metric_value)


def best_per_method(rows: list[Row], budget_gmacs=None, budget_ms=None) -> dict[str, Row | None]:
    """{method: its best row within the budget, or None} for every method swept."""
    return {m: best_within_budget(rows, budget_gmacs, budget_ms, m) for m in methods_of(rows)}


def pareto_front(rows: list[Row], x: str) -> list[Row]:
    """Rows no other row beats on both ``x`` (lower better for GMACs, latency and memory,
    higher for FPS and speed-up) and the metric; sorted by ``x``."""
    lower_x = x not in _HIGHER_IS_BETTER
    lower_m = _lower_metric(rows)

    def better_eq(a, b):  # a at least as good as b on both, strictly on one
        ax, bx, am, bm = getattr(a, x), getattr(b, x), a.metric_value, b.metric_value
        gx = ax <= bx if lower_x else ax >= bx
        gm = am <= bm if lower_m else am >= bm
        return gx and gm and (ax != bx or am != bm)

    valid = [r for r in rows if getattr(r, x) is not None and r.metric_value is not None]
    front = [r for r in valid if not any(better_eq(o, r) for o in valid)]
    return sorted(front, key=lambda r: getattr(r, x))


def _budget_text(budget_gmacs, budget_ms) -> str:
    return " and ".join(s for s in (budget_gmacs is not None and f"{budget_gmacs} backbone GMACs",
                                    budget_ms is not None and f"{budget_ms} ms") if s)


def same_run_baseline_ms(r: Row) -> float | None:
    """The baseline's time measured in the same run as ``r`` (beside it), ms: the row's
    ``baseline_latency_ms_same_run``, or for rows written before it was recorded, what their
    speed-up implies (speed-up x latency, the speed-up's definition); None where not timed."""
    if r.baseline_latency_ms_same_run is not None:
        return r.baseline_latency_ms_same_run
    if r.speedup_vs_baseline is not None and r.latency_ms is not None:
        return r.speedup_vs_baseline * r.latency_ms
    return None


def timing_spread(rows: list[Row]) -> tuple[float, float, int] | None:
    """(lowest, highest, count) of the baseline's time over the runs of the sweep (once beside
    every point, the baseline's own run included), ms; None with fewer than two runs."""
    times = [t for t in (same_run_baseline_ms(r) for r in rows) if t is not None]
    if len(times) < 2:
        return None
    return min(times), max(times), len(times)


def within_spread(speedup: float, spread) -> bool:
    """Whether ``speedup`` lies within the run-to-run spread (lo, hi, n) of the baseline's time:
    between lo / hi and hi / lo, what the same computation timed in two runs can show."""
    lo, hi, _ = spread
    return lo / hi <= speedup <= hi / lo


def _noise(r: Row, spread) -> str:
    if r.baseline or r.speedup_vs_baseline is None or spread is None:
        return "-"
    return "within" if within_spread(r.speedup_vs_baseline, spread) else "beyond"


def _spread_note(rows: list[Row], spread) -> list[str]:
    """The table's lines on the run-to-run spread of the baseline's time (none without one)."""
    if spread is None:
        return []
    lo, hi, n = spread
    lines = [f"Run-to-run spread: the baseline, timed again beside every point, took {lo:.1f} to {hi:.1f} ms "
             f"over the {n} runs of this sweep (highest / lowest = {hi / lo:.2f}). A speed-up between "
             f"{lo / hi:.2f}x and {hi / lo:.2f}x is within that spread (column \"vs. spread\": within): "
             "the same model timed twice can differ that much, so it cannot be told from noise."]
    timed = [r for r in rows if not r.baseline and r.speedup_vs_baseline is not None]
    if timed and all(within_spread(r.speedup_vs_baseline, spread) for r in timed):
        lines.append("**Every speed-up in this table is within the run-to-run spread: on this machine these "
                     "timings show no speed-up that noise could not explain.**")
    return lines


def _delta(r: Row, base: Row | None) -> str:
    if base is None or r.metric_value is None or base.metric_value is None:
        return "-"
    return f"{r.metric_value - base.metric_value:+.3f}"


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (tables read the same
    on every checkout), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def table_markdown(rows: list[Row], budget_gmacs=None, budget_ms=None) -> str:
    """The points table, the best within the budget, and the best setting of each method."""
    base = next((r for r in rows if r.baseline), None)
    r0 = rows[0]
    metric = r0.metric
    spread = timing_spread(rows)
    unit = "one image" if not r0.frames else f"one clip of {r0.frames} frames (per clip)"
    clip = "" if not r0.frames else f", clips of {r0.frames} frames"
    lines = [f"Sweep of `{_shown(r0.config_file)}` at input {r0.input_size[0]}x{r0.input_size[1]}{clip} on {r0.device} "
             f"({len(rows)} points; GMACs: fvcore multiply-adds, {unit} (GFLOPs = 2 x GMACs); each point is "
             "timed in a run of its own, interleaved with the baseline (batch 1, medians): \"point ms\" is the "
             "point's time, \"baseline ms, same run\" the baseline's in that run, and speed-up = baseline ms, "
             "same run / point ms, so machine drift between runs cancels (compare a point's time with the "
             "baseline of its own row, not with the baseline row's); FPS = 1000 / point ms; deltas vs. the "
             "baseline row)", "", *_spread_note(rows, spread), *([""] if spread else []),
             f"| point | method | backbone GMACs | model GMACs | point ms | baseline ms, same run | speed-up "
             f"| vs. spread | FPS | peak MB | {metric} | delta |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        b = base or r
        lines.append(
            f"| {r.label} | {r.method} | {_fmt(r.backbone_gmacs)} ({_pct(r.backbone_gmacs, b.backbone_gmacs)}) "
            f"| {_fmt(r.model_gmacs)} ({_pct(r.model_gmacs, b.model_gmacs)}) "
            f"| {_fmt(r.latency_ms, 1)} | {_fmt(same_run_baseline_ms(r), 1)} | {_speedup(r)} | {_noise(r, spread)} "
            f"| {_fmt(r.fps)} | {_fmt(r.peak_memory_mb, 0)} | {_fmt(r.metric_value, 3)} | {_delta(r, base)} |")
    what = _budget_text(budget_gmacs, budget_ms)
    if what:
        best = best_within_budget(rows, budget_gmacs, budget_ms)
        lines += ["", f"Best {metric} within {what}: " +
                  ("none fits" if best is None else
                   f"**{best.label}** ({metric} {best.metric_value:.3f}, "
                   f"{_fmt(best.backbone_gmacs)} backbone GMACs, {_fmt(best.latency_ms, 1)} ms)")]
    per_method = best_per_method(rows, budget_gmacs, budget_ms)
    if per_method:
        lines += ["", f"Best setting of each method within {what or 'no budget (--budget-gmacs / --budget-ms)'}:",
                  "", f"| method | point | {metric} | delta | backbone GMACs | point ms | baseline ms, same run "
                  "| speed-up | vs. spread |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for method, r in per_method.items():
            if r is None:
                lines.append(f"| {method} | none fits | - | - | - | - | - | - | - |")
            else:
                lines.append(f"| {method} | {r.label} | {_fmt(r.metric_value, 3)} | {_delta(r, base)} "
                             f"| {_fmt(r.backbone_gmacs)} | {_fmt(r.latency_ms, 1)} "
                             f"| {_fmt(same_run_baseline_ms(r), 1)} | {_speedup(r)} | {_noise(r, spread)} |")
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[Row], path: Path) -> None:
    """``pareto.png``: metric vs. backbone GMACs and vs. measured speed-up; per method its
    points, labelled, and its Pareto front (the baseline included: every method starts
    there); the baseline starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r0 = rows[0]
    base = [r for r in rows if r.baseline]
    colours = dict(zip(methods_of(rows), plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (x, xlabel) in zip(axes, _AXES):
        for method, colour in colours.items():
            pts = [r for r in rows if r.method == method and getattr(r, x) is not None and r.metric_value is not None]
            ax.scatter([getattr(r, x) for r in pts], [r.metric_value for r in pts], s=28, color=colour,
                       label=method, zorder=3)
            for r in pts:
                ax.annotate(r.label, (getattr(r, x), r.metric_value), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            front = pareto_front(pts + base, x)
            if len(front) > 1:
                ax.plot([getattr(r, x) for r in front], [r.metric_value for r in front], "-", color=colour,
                        lw=1.5, alpha=0.8, zorder=2)
        for r in base:
            if getattr(r, x) is not None and r.metric_value is not None:
                ax.scatter([getattr(r, x)], [r.metric_value], marker="*", s=180, color="tab:red",
                           label=BASELINE, zorder=4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(r0.metric + (" (lower is better)" if _lower_metric(rows) else ""))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="method (line: Pareto front)", title_fontsize=8)
    fig.suptitle(f"{Path(r0.config_file).name}: {r0.metric} vs. cost "
                 f"(input {r0.input_size[0]}x{r0.input_size[1]}{'' if not r0.frames else f' x {r0.frames} frames'}, "
                 f"{r0.device})", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def write_report(out_dir, budget_gmacs=None, budget_ms=None) -> tuple[list[Row], Row | None]:
    """``table.md`` and ``pareto.png`` from every row under ``out_dir``; returns the rows and
    the budget's best row (None without a budget or when nothing fits)."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    if not rows:
        raise SweepError(f"no sweep results under {out_dir}")
    atomic_write(out_dir / "table.md", table_markdown(rows, budget_gmacs, budget_ms))
    plot_pareto(rows, out_dir / "pareto.png")
    budget = budget_gmacs is not None or budget_ms is not None
    return rows, best_within_budget(rows, budget_gmacs, budget_ms) if budget else None
