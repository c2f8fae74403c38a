"""Several processes for ``train_net.py``: Detectron2's ``launch`` on CUDA, ours on CPU.

Detectron2 0.6's :func:`detectron2.engine.launch` asserts CUDA and hard-codes NCCL, so on a
machine without GPUs ``--num-gpus N`` could not run. :func:`launch` keeps it for NCCL and,
for gloo, runs :func:`launch_cpu`: ``--num-gpus`` processes per machine, started with
``torch.multiprocessing`` (spawn), each joining one ``torch.distributed`` gloo process group
(``--num-machines`` x ``--num-gpus`` ranks, rank = machine rank x processes per machine +
local rank, ``--dist-url`` to meet) and Detectron2's per-machine process group, as
Detectron2's own workers do. So ``comm.get_world_size()``, ``comm.gather``,
``comm.synchronize``, Detectron2's ``InferenceSampler`` (each rank a contiguous share of the
images) and its evaluators work unchanged.

The backend (``--dist-backend``): ``auto`` is NCCL where CUDA is available and gloo
elsewhere; ``gloo`` on a CUDA machine runs the same CPU launch (process i uses GPU
i mod #GPUs if its ``MODEL.DEVICE`` is ``cuda``). Each CPU process runs
``torch.get_num_threads() // processes per machine`` intra-op threads (at least one), so N
processes share the machine's cores instead of each taking all of them; ``OMP_NUM_THREADS``
sets the total.

A process that raises ends the run: the others are stopped and :class:`WorkerError` carries
the failed process's rank and traceback. When several fail (a rank that raised, then the
ranks whose collective lost it), the first to fail is reported. On several machines, the
other machines' processes fail on their next collective with the lost connection; each
machine reports its own.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .fileio import atomic_write

__all__ = ["DIST_BACKENDS", "DEFAULT_TIMEOUT", "LaunchError", "WorkerError", "resolve_backend", "launch", "launch_cpu"]

DIST_BACKENDS = ("auto", "nccl", "gloo")
DEFAULT_TIMEOUT = timedelta(minutes=30)  # Detectron2's


class LaunchError(ValueError):
    """The launch flags cannot work (``--num-gpus``, ``--num-machines``, ``--machine-rank``,
    ``--dist-url``, ``--dist-backend``); the message names the flag and the value."""


class WorkerError(RuntimeError):
    """A process of a multi-process run failed; the message names its rank and holds its
    traceback (the exception type and message on the last line)."""


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``nccl`` where CUDA is available, else ``gloo``; ``nccl`` without CUDA is
    an error naming the way out."""
    if backend not in DIST_BACKENDS:
        raise LaunchError(f"--dist-backend {backend!r}: expected one of {list(DIST_BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("--dist-backend nccl needs CUDA, and this machine has none; "
                          "--dist-backend gloo (or auto) runs the processes on the CPU")
    return backend


def launch(main_func, num_processes: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str | None = None, args=(), backend: str = "auto", timeout=DEFAULT_TIMEOUT):
    """``main_func(*args)`` in ``num_processes`` processes on each of ``num_machines``
    machines: Detectron2's ``launch`` for NCCL (one process per GPU), :func:`launch_cpu`
    for gloo. One process in all runs ``main_func`` here, without a process group."""
    _check_flags(num_processes, num_machines, machine_rank, dist_url)
    if resolve_backend(backend) == "nccl":
        from detectron2.engine import launch as d2_launch

        return d2_launch(main_func, num_processes, num_machines=num_machines, machine_rank=machine_rank,
                         dist_url=dist_url, args=args, timeout=timeout)
    return launch_cpu(main_func, num_processes, num_machines, machine_rank, dist_url, args, timeout)


def _check_flags(num_processes, num_machines, machine_rank, dist_url) -> None:
    for name, value in (("--num-gpus", num_processes), ("--num-machines", num_machines)):
        if not isinstance(value, int) or value < 1:
            raise LaunchError(f"{name} {value!r}: expected an integer >= 1")
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(f"--machine-rank {machine_rank}: expected 0 <= rank < --num-machines {num_machines}")
    if num_machines > 1 and (not dist_url or dist_url == "auto"):
        raise LaunchError(f"--dist-url {dist_url!r} works on one machine only; with --num-machines "
                          f"{num_machines} give machine 0's address on every machine, e.g. "
                          "--dist-url tcp://HOST:PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def launch_cpu(main_func, num_processes: int, num_machines: int = 1, machine_rank: int = 0,
               dist_url: str | None = None, args=(), timeout=DEFAULT_TIMEOUT):
    """``main_func(*args)`` in ``num_processes`` spawned processes on this machine (machine
    ``machine_rank`` of ``num_machines``), ranks joined by gloo at ``dist_url``
    (``tcp://HOST:PORT`` of machine 0; ``auto``: a free port here, one machine only). Waits
    for all; a failed process raises :class:`WorkerError`."""
    _check_flags(num_processes, num_machines, machine_rank, dist_url)
    world_size = num_machines * num_processes
    if world_size == 1:
        return main_func(*args)
    if not dist_url or dist_url == "auto":
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    threads = max(1, torch.get_num_threads() // num_processes)
    failures = tempfile.mkdtemp(prefix="expedit-d2-launch-")
    try:
        context = mp.start_processes(
            _cpu_worker, nprocs=num_processes, join=False, start_method="spawn",
            args=(main_func, world_size, num_processes, machine_rank, dist_url, args, timeout, threads, failures))
        try:
            while not context.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _first_failure(failures, e, machine_rank * num_processes, world_size) from None
        except KeyboardInterrupt:  # Ctrl-C reached the processes too; make sure none is left
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                process.join()
            raise
        finally:
            for path in context.error_files:  # torch's copies of the tracebacks
                if path:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
    finally:
        shutil.rmtree(failures, ignore_errors=True)


def _first_failure(failures: str, error, first_rank: int, world_size: int) -> WorkerError:
    """The failure of the process that failed first. Each process that raised left (the
    time, its traceback) in ``failures`` before it ended; the earliest is the cause (the
    collectives of the others failed only after it had ended)."""
    failed = []
    for name in os.listdir(failures):
        with open(os.path.join(failures, name), "rb") as f:
            failed.append(pickle.load(f))
    if not failed:  # killed by a signal or ended without a traceback: torch's message
        index = getattr(error, "error_index", 0)
        return WorkerError(f"process {index} (rank {first_rank + index} of {world_size}) failed: {error}")
    failed.sort()
    _, index, trace = failed[0]
    others = sorted(first_rank + i for _, i, _ in failed[1:])
    then = f" (then rank(s) {others} failed too)" if others else ""
    return WorkerError(f"process {index} (rank {first_rank + index} of {world_size}) failed{then}:\n"
                       f"{trace.rstrip()}")


def _cpu_worker(local_rank, main_func, world_size, num_processes, machine_rank, dist_url, args, timeout,
                threads, failures):
    """One spawned process: :func:`_run_worker`; if it raises, (the time, the local rank, the
    traceback) go to ``failures`` first (CLOCK_MONOTONIC: one clock for the machine's
    processes), written before this process ends and so before any other rank can lose it."""
    try:
        _run_worker(local_rank, main_func, world_size, num_processes, machine_rank, dist_url, args, timeout,
                    threads)
    except Exception:
        atomic_write(os.path.join(failures, str(local_rank)),
                     pickle.dumps((time.monotonic_ns(), local_rank, traceback.format_exc())))
        raise


def _run_worker(local_rank, main_func, world_size, num_processes, machine_rank, dist_url, args, timeout, threads):
    """Its share of the threads, the gloo group, Detectron2's per-machine group (as
    ``detectron2.engine.launch._distributed_worker`` sets it), then ``main_func(*args)``."""
    from detectron2.utils import comm

    torch.set_num_threads(threads)
    rank = machine_rank * num_processes + local_rank
    try:
        dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    except Exception as e:
        raise RuntimeError(f"rank {rank} of {world_size} could not join the process group at {dist_url}: {e}") from e
    if torch.cuda.is_available():  # --dist-backend gloo on a CUDA machine: a GPU per process
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    # Detectron2 0.6 keeps the per-machine group in comm._LOCAL_PROCESS_GROUP (its launch sets it
    # so); every rank creates every machine's group, in the same order
    assert comm._LOCAL_PROCESS_GROUP is None
    for machine in range(world_size // num_processes):
        group = dist.new_group(list(range(machine * num_processes, (machine + 1) * num_processes)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)
    # every rank past main_func before any tears its group down: a rank that destroyed its
    # gloo group (and exited) while a peer was still evaluating aborted at exit, now and then
    # ("terminate called without an active exception", SIGABRT)
    comm.synchronize()
    dist.destroy_process_group()
