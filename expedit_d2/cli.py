"""Command-line conventions shared by expedit-d2's scripts."""
from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


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
