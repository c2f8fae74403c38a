"""Command-line conventions shared by expedit-d2's scripts."""
from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "add_timing_arguments", "apply_timing_arguments", "AMP_DTYPES", "add_amp_argument",
           "autocast", "emit_report"]

#: ``--amp`` choices -> autocast dtypes
AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's line breaks and shows the default of every
    option that has one, also of options declared without a help text (flags, and
    options whose default is unset, show none)."""

    def _format_action(self, action):
        if action.help is None and self._default(action) is not None:
            action.help = "(default: %(default)s)"  # argparse prints no line for help=None
            try:
                return super()._format_action(action)
            finally:
                action.help = None
        return super()._format_action(action)

    @staticmethod
    def _default(action):
        if (not action.option_strings or action.nargs == 0
                or action.default in (None, False, argparse.SUPPRESS, [], "")):
            return None
        return action.default

    def _get_help_string(self, action):
        help = action.help or ""
        if self._default(action) is not None and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


def add_timing_arguments(parser: argparse.ArgumentParser, repeats: int, warmup: int) -> None:
    """The benchmarks' shared timing options: --device, --repeats, --warmup, --threads,
    --keep-denormals (see :func:`apply_timing_arguments`)."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls (their median)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--keep-denormals", action="store_true",
                        help="CPU: compute with denormal floats (by default they are flushed to zero, "
                             "so timings do not depend on how many activations of random or trained "
                             "weights fall into the slow denormal range)")


def apply_timing_arguments(args) -> None:
    """Set the thread count and the denormal mode that :func:`add_timing_arguments` parsed."""
    import torch

    from .measure import set_flush_denormal

    torch.set_num_threads(args.threads)
    set_flush_denormal(not args.keep_denormals)


def add_amp_argument(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--amp fp16|bf16`` (default: off); see :func:`autocast`."""
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast dtype (default: off)")


def autocast(device, amp: str | None):
    """``torch.autocast`` on ``device``'s type with the ``--amp`` dtype, or a no-op context
    when ``amp`` is None."""
    import contextlib

    import torch

    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, AMP_DTYPES[amp]))


def emit_report(table: str, data, output=None) -> None:
    """Print a benchmark's table; with ``output``, also write ``<output>.md`` and
    ``<output>.json`` atomically (:func:`expedit_d2.measure.write_report`)."""
    from .measure import write_report

    print(table)
    if output:
        write_report(output, table, data)
