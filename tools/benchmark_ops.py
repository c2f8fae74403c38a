#!/usr/bin/env python
"""Time and measure token clustering + reconstruction: ours against the dense reference.

    python tools/benchmark_ops.py                       # all built-in cases, auto device
    python tools/benchmark_ops.py --cases swin_l_1024 dpt_hybrid_24x24 --repeats 9
    python tools/benchmark_ops.py --device cuda --output results/ops.md

Each case runs clustering (n iterations) followed by reconstruction of the cluster
tokens, once with ``expedit_d2.ops`` and once with the dense reference of the tests
(``tests/dense_reference.py``: full (B, N, M) distance matrices, float32), in the
same process, interleaved, after warm-up. Reported:

* median latency of each and the ratio ours / dense (one run, so machine noise hits
  both alike);
* peak *extra* memory of one call, measured in a fresh subprocess per
  (case, implementation): on CPU the growth of the resident set's high-water mark
  over the resident set with the inputs allocated (Linux ``/proc``; glibc's mmap
  threshold is fixed at 1 MB there, ``expedit_d2.measure.run_memory_child``), on CUDA
  ``torch.cuda.max_memory_allocated`` over the memory held before the call;
* the largest absolute difference between the two outputs (a sanity check).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from expedit_d2.measure import (  # noqa: E402
    peak_memory,
    run_memory_child,
    time_interleaved,
)
from expedit_d2.ops import DEFAULT_MEMORY_LIMIT, token_clustering, token_reconstruction  # noqa: E402
from tests.dense_reference import dense_clustering, dense_reconstruction  # noqa: E402
from expedit_d2.cli import HelpFormatter, emit_report  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    batch: int  # samples x windows
    grid: tuple  # (H, W) tokens per sample/window
    clusters: tuple  # (h, w)
    channels: int
    prefix: int
    window: int  # lambda
    tau: float
    k: int
    tau_r: float
    iters: int = 5


def _windows(size: int, win: int) -> int:
    return -(-size // win)  # windows per side after padding


CASES = {
    c.name: c
    for c in [
        Case("swin_l_1024", "Swin-L stage 3 @1024x1024: 64x64 tokens, 12x12 windows -> 8x8",
             _windows(64, 12) ** 2, (12, 12), (8, 8), 768, 0, 7, 0.05, 10, 0.05),
        Case("dpt_hybrid_24x24", "DPT-Hybrid NYUv2: 40x30 tokens + cls -> 24x24",
             1, (30, 40), (24, 24), 768, 1, 5, 1.0, 20, 1.0),
        Case("dpt_hybrid_16x16", "DPT-Hybrid NYUv2: 40x30 tokens + cls -> 16x16",
             1, (30, 40), (16, 16), 768, 1, 5, 1.0, 20, 1.0),
        Case("sam_vit_h", "SAM ViT-H: 64x64 tokens, 14x14 windows -> 10x10",
             _windows(64, 14) ** 2, (14, 14), (10, 10), 1280, 0, 5, 0.05, 10, 0.05),
        Case("global_128_to_64", "large global: 128x128 tokens -> 64x64",
             1, (128, 128), (64, 64), 1024, 0, 5, 1.0, 20, 1.0),
    ]
}


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    H, W = case.grid
    x = torch.randn(case.batch, case.prefix + H * W, case.channels, generator=g)
    return x.to(device)


def run_ours(case: Case, x: torch.Tensor, memory_limit: int) -> torch.Tensor:
    clusters, state = token_clustering(x, case.grid, case.clusters, case.iters, case.tau,
                                       case.window, case.prefix, memory_limit)
    return token_reconstruction(clusters, state, case.k, case.tau_r, memory_limit)


def run_dense(case: Case, x: torch.Tensor, memory_limit: int) -> torch.Tensor:
    clusters, xs, s = dense_clustering(x, case.grid, case.clusters, case.iters, case.tau,
                                       case.window, case.prefix, dtype=torch.float32)
    return dense_reconstruction(clusters, xs, s, case.k, case.tau_r, case.prefix,
                                dtype=torch.float32)


IMPLS = {"ours": run_ours, "dense": run_dense}


def time_case(case: Case, device: str, repeats: int, warmup: int, memory_limit: int):
    x = make_inputs(case, device)
    with torch.inference_mode():
        medians = time_interleaved({name: (lambda fn=fn: fn(case, x, memory_limit))
                                    for name, fn in IMPLS.items()}, device, repeats, warmup)
        diff = (run_ours(case, x, memory_limit) - run_dense(case, x, memory_limit)).abs().max()
    return medians, diff.item()


# ---------------------------------------------------------------- memory (subprocess)
def measure_memory_child(case: Case, impl: str, device: str, memory_limit: int) -> int:
    """Peak extra bytes of one call (runs in a fresh process)."""
    fn = IMPLS[impl]
    # Warm up on a tiny version of the case first, so that code pages and thread pools
    # touched by the first call are not counted as memory of the operator.
    H, W = min(case.grid[0], 8), min(case.grid[1], 8)
    tiny = replace(case, batch=1, grid=(H, W), k=1,
                   clusters=(min(case.clusters[0], H), min(case.clusters[1], W)))
    x = make_inputs(case, device)
    with torch.inference_mode():
        fn(tiny, make_inputs(tiny, device), memory_limit)
        return peak_memory(lambda: fn(case, x, memory_limit), device)


def measure_memory(case: Case, impl: str, device: str, memory_limit: int, threads: int) -> int:
    cmd = [sys.executable, __file__, "--_memory-child", case.name, impl, "--device", device,
           "--memory-limit-mb", str(memory_limit / 2**20), "--threads", str(threads)]
    return int(run_memory_child(cmd))


# ---------------------------------------------------------------- report
def format_table(rows, device: str, threads: int, memory_limit: int) -> str:
    head = (
        f"Token clustering + reconstruction, ours vs dense reference; device {device}, "
        f"{threads} threads, torch {torch.__version__}, chunk memory limit "
        f"{memory_limit / 2**20:.0f} MB\n\n"
        "| case | B x (H, W) -> (h, w), C | ours ms | dense ms | time ours/dense "
        "| ours extra MB | dense extra MB | memory dense/ours | max abs diff |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        c = r["case"]
        shape = f"{c['batch']} x {tuple(c['grid'])} -> {tuple(c['clusters'])}, {c['channels']}"
        mem_ratio = r["dense_mb"] / max(r["ours_mb"], 1e-9)
        lines.append(
            f"| {c['name']} | {shape} | {r['ours_ms']:.1f} | {r['dense_ms']:.1f} | "
            f"{r['time_ratio']:.3f} | {r['ours_mb']:.1f} | {r['dense_mb']:.1f} | "
            f"{mem_ratio:.1f}x | {r['max_abs_diff']:.1e} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-limit-mb", type=float, default=DEFAULT_MEMORY_LIMIT / 2**20)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--output", type=Path, help="also write the table (.md) and rows (.json)")
    parser.add_argument("--_memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    memory_limit = int(args.memory_limit_mb * 2**20)

    if args._memory_child:
        name, impl = args._memory_child
        print(measure_memory_child(CASES[name], impl, args.device, memory_limit))
        return

    rows = []
    for name in args.cases:
        case = CASES[name]
        print(f"[benchmark_ops] {name}: {case.what}", file=sys.stderr, flush=True)
        medians, diff = time_case(case, args.device, args.repeats, args.warmup, memory_limit)
        mem = {impl: (0 if args.no_memory else
                      measure_memory(case, impl, args.device, memory_limit, args.threads))
               for impl in IMPLS}
        rows.append({
            "case": asdict(case),
            "ours_ms": medians["ours"] * 1e3,
            "dense_ms": medians["dense"] * 1e3,
            "time_ratio": medians["ours"] / medians["dense"],
            "ours_mb": mem["ours"] / 2**20,
            "dense_mb": mem["dense"] / 2**20,
            "max_abs_diff": diff,
        })
    emit_report(format_table(rows, args.device, args.threads, memory_limit),
                {"device": args.device, "threads": args.threads, "torch": torch.__version__, "rows": rows},
                args.output)


if __name__ == "__main__":
    main()
