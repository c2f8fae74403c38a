"""Progress bars where the user is looking (expedit_d2.progress): on a terminal only, with
start/end lines in the log either way; the training hook on Detectron2's own trainer."""
import io
import logging
import sys

import pytest
import torch
from detectron2.engine import SimpleTrainer
from torch import nn

from expedit_d2.progress import TrainingProgress, is_terminal, logs_above, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"loss": (self.w * batch).pow(2).mean()}


def _loader():
    while True:
        yield torch.randn(4, 3)


@pytest.fixture
def log_lines():
    """The messages of expedit_d2.progress's logger (whatever handlers other tests set up)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("expedit_d2.progress")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _train(hook, start=0, max_iter=5):
    model = _Tiny()
    trainer = SimpleTrainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.register_hooks([hook])
    trainer.train(start, max_iter)


def test_the_training_bar_counts_the_iterations_on_a_terminal(log_lines):
    stream = _Terminal()
    _train(TrainingProgress(stream=stream), start=2, max_iter=7)  # resumed at iteration 2
    out = stream.getvalue()
    assert "train: " in out and "7/7" in out and "loss " in out  # iterations, ETA line, latest loss
    assert "2/7" in out  # the bar starts where training resumed
    assert log_lines[0] == "training: iterations 2 to 7"
    assert log_lines[-1].startswith("training: 5 iterations done in ")


def test_no_bar_in_a_log_only_the_start_and_end_lines(log_lines):
    stream = io.StringIO()  # a file or a pipe: not a terminal
    assert not is_terminal(stream) and is_terminal(_Terminal())
    _train(TrainingProgress(stream=stream))
    assert stream.getvalue() == ""
    assert log_lines == ["training: iterations 0 to 5", log_lines[1]] and "5 iterations done" in log_lines[1]


def test_a_failed_run_says_where_it_stopped(log_lines):
    class Failing(_Tiny):
        def forward(self, batch):
            if self.calls == 3:
                raise RuntimeError("boom")
            self.calls += 1
            return super().forward(batch)

    model = Failing()
    model.calls = 0
    trainer = SimpleTrainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.register_hooks([TrainingProgress(stream=io.StringIO())])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(0, 10)
    assert log_lines[-1].startswith("training: stopped at iteration 3 of 10 after ")


def test_progress_bar_draws_on_a_terminal_only():
    quiet, shown = io.StringIO(), _Terminal()
    assert list(progress_bar(range(3), desc="x", stream=quiet)) == [0, 1, 2] and quiet.getvalue() == ""
    assert list(progress_bar(range(3), desc="x", stream=shown)) == [0, 1, 2] and "3/3" in shown.getvalue()
    forced = io.StringIO()
    list(progress_bar(range(2), desc="x", stream=forced, enabled=True))
    assert "2/2" in forced.getvalue()


def test_log_lines_print_above_a_drawn_bar_not_into_it(log_lines):
    """A logger printing to the terminal goes through tqdm.write while a bar is drawn (the bar
    is lifted and redrawn), its own handler again afterwards; nothing changes without a bar."""
    logger = logging.getLogger("expedit_d2.test_console")
    console = logging.StreamHandler(sys.stdout)
    logger.addHandler(console)
    seen = []
    try:
        bar = progress_bar(total=2, stream=_Terminal())
        with bar, logs_above(bar):
            assert [type(h).__name__ for h in logger.handlers] == ["_TqdmLoggingHandler"]
        assert logger.handlers == [console]
        quiet = progress_bar(total=2, stream=io.StringIO())
        with quiet, logs_above(quiet):
            assert logger.handlers == [console]

        class Look(TrainingProgress):  # the handlers during the training steps
            def after_step(self):
                seen.append([type(h).__name__ for h in logger.handlers])
                super().after_step()

        _train(Look(stream=_Terminal()), max_iter=2)
        assert seen == [["_TqdmLoggingHandler"]] * 2 and logger.handlers == [console]
    finally:
        logger.removeHandler(console)
