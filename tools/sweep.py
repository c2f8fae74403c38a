#!/usr/bin/env python
"""Accuracy-versus-GMACs sweeps: the same command as ``python -m expedit_d2.sweep``
(see that module, or ``--help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expedit_d2.sweep import cli  # noqa: E402

if __name__ == "__main__":
    cli()
