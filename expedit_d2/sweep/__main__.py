"""``python -m expedit_d2.sweep``: see :mod:`expedit_d2.sweep.cli`."""
from .cli import cli

cli()
