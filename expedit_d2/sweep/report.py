"""The report, rebuilt from every row: ``table.md`` (deltas vs. the baseline, a method
column, the best setting of each method within the budget) and ``pareto.png`` (the metric
vs. backbone GMACs and vs. the measured speed-up: one series and Pareto front per method,
the baseline starred).
"""
from __future__ import annotations

from pathlib import Path

from ..fileio import atomic_write
from .spec import BASELINE, DEFAULT_METHOD, SweepError
from .store import Row, read_rows

__all__ = ["best_within_budget", "best_per_method", "methods_of", "pareto_front", "table_markdown",
           "plot_pareto", "write_report"]

# x axes of the plot: (row field, axis label)
_AXES = (("backbone_gmacs", "backbone GMACs"), ("speedup_vs_baseline", "speed-up vs. baseline (measured)"))
# cost fields where higher is better
_HIGHER_IS_BETTER = ("fps", "speedup_vs_baseline")


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


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
    lines = [f"Sweep of `{_shown(r0.config_file)}` at input {r0.input_size[0]}x{r0.input_size[1]} on {r0.device} "
             f"({len(rows)} points; GMACs: fvcore multiply-adds, one image (GFLOPs = 2 x GMACs); latency: "
             "median, batch 1; speed-up: baseline time / point time, the two timed interleaved in one run, "
             "so machine drift cancels; deltas vs. the baseline)", "",
             f"| point | method | backbone GMACs | model GMACs | latency ms | FPS | speed-up | peak MB | "
             f"{metric} | delta |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base or r
        lines.append(
            f"| {r.label} | {r.method} | {_fmt(r.backbone_gmacs)} ({_pct(r.backbone_gmacs, b.backbone_gmacs)}) "
            f"| {_fmt(r.model_gmacs)} ({_pct(r.model_gmacs, b.model_gmacs)}) "
            f"| {_fmt(r.latency_ms, 1)} | {_fmt(r.fps)} | {_fmt(r.speedup_vs_baseline)}x "
            f"| {_fmt(r.peak_memory_mb, 0)} | {_fmt(r.metric_value, 3)} | {_delta(r, base)} |")
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
                  "", f"| method | point | {metric} | delta | backbone GMACs | latency ms | speed-up |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for method, r in per_method.items():
            if r is None:
                lines.append(f"| {method} | none fits | - | - | - | - | - |")
            else:
                lines.append(f"| {method} | {r.label} | {_fmt(r.metric_value, 3)} | {_delta(r, base)} "
                             f"| {_fmt(r.backbone_gmacs)} | {_fmt(r.latency_ms, 1)} "
                             f"| {_fmt(r.speedup_vs_baseline)}x |")
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
                 f"(input {r0.input_size[0]}x{r0.input_size[1]}, {r0.device})", fontsize=10)
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
