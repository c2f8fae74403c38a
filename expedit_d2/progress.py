"""Progress where the user is looking: bars on a terminal, a few log lines elsewhere.

:func:`progress_bar` is tqdm drawn only when its stream is a terminal (redrawn at most once a
second), so that logs written to a file or collected by CI get no bar lines at all; whoever
uses one logs the start and the end of the stage in plain lines as well.
:class:`TrainingProgress` is the Detectron2 hook that drives one over a training run's
iterations (every project's ``train_net.py`` registers it, see
:func:`expedit_d2.engine.train_or_evaluate`).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

from detectron2.engine import HookBase

__all__ = ["is_terminal", "progress_bar", "logs_above", "TrainingProgress"]

logger = logging.getLogger(__name__)

#: the shortest time between two redraws of a bar, seconds
MIN_INTERVAL = 1.0


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (not a file, a pipe or a CI log)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0,
                 stream=None, enabled: bool | None = None):
    """A tqdm bar (with its ETA) on ``stream`` (default: stderr), drawn only when ``enabled``
    (default: when ``stream`` is a terminal), redrawn at most every :data:`MIN_INTERVAL`
    seconds. A disabled bar still counts (``n``) and iterates."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    enabled = is_terminal(stream) if enabled is None else enabled
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, disable=not enabled,
                mininterval=MIN_INTERVAL, dynamic_ncols=True)


def _console_loggers() -> list[logging.Logger]:
    """The loggers (root included) with a handler that prints to stdout or stderr."""
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [lg for lg in loggers if any(isinstance(h, logging.StreamHandler)
                                        and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
                                        for h in lg.handlers)]


@contextlib.contextmanager
def logs_above(bar):
    """While ``bar`` is drawn, every logger that prints to the terminal prints above the bar
    (through ``tqdm.write``, which lifts the bar and redraws it) instead of into its line; the
    loggers' handlers are given back on leaving. A bar that is not drawn changes nothing."""
    if bar.disable:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=_console_loggers(), tqdm_class=type(bar)):
        yield


class TrainingProgress(HookBase):
    """A bar over the training iterations (from the resumed one to ``SOLVER.MAX_ITER``) with
    the ETA and the latest total loss, on stderr when it is a terminal; in any case one log
    line when training starts and one when it ends (how far it got, how long it took).

    ``stream`` / ``enabled`` as :func:`progress_bar`. Register it on the main process only."""

    def __init__(self, stream=None, enabled: bool | None = None):
        self._stream, self._enabled = stream, enabled
        self._bar, self._t0, self._t1 = None, 0.0, 0.0
        self._logs = contextlib.ExitStack()  # the loggers printing above the bar, while it is drawn

    def before_train(self):
        t = self.trainer
        logger.info(f"training: iterations {t.start_iter} to {t.max_iter}")
        self._t0 = self._t1 = time.perf_counter()
        self._bar = progress_bar(total=t.max_iter, initial=t.start_iter, desc="train", unit="it",
                                 stream=self._stream, enabled=self._enabled)
        self._logs.enter_context(logs_above(self._bar))

    def after_step(self):
        if self._bar is None:
            return
        try:  # the loss of the step just run (written by the trainer before the hooks' after_step)
            loss = self.trainer.storage.history("total_loss").latest()
        except KeyError:
            loss = None
        if loss is not None:
            self._bar.set_postfix_str(f"loss {loss:.3g}", refresh=False)
        self._bar.update(1)
        self._t1 = time.perf_counter()  # the end of the last step (after_train may evaluate after it)

    def after_train(self):
        if self._bar is None:
            return
        self._logs.close()
        self._bar.close()
        self._bar = None
        t = self.trainer
        # trainer.iter is max_iter once the loop has finished, the failed iteration otherwise
        done = t.iter >= t.max_iter
        seconds = self._t1 - self._t0
        if done:
            logger.info(f"training: {t.max_iter - t.start_iter} iterations done in {seconds:.0f} s")
        else:
            logger.info(f"training: stopped at iteration {t.iter} of {t.max_iter} after {seconds:.0f} s of steps")
