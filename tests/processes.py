"""Child processes for the tests that interrupt them as Ctrl-C would."""
import contextlib
import os
import signal
import subprocess


@contextlib.contextmanager
def process_group(cmd, **popen_kwargs):
    """``Popen(cmd)`` in a session of its own, so that ``os.killpg(proc.pid, ...)`` reaches it
    and its children as Ctrl-C in a terminal does, with SIGINT at its default in the child
    (a suite started in the background by a non-interactive shell, ``cmd &``, ignores SIGINT,
    and children inherit that). On leaving, a process still running is killed with its
    group, so a failed test never leaves one behind to slow down the rest of the suite."""
    proc = subprocess.Popen(cmd, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen_kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
