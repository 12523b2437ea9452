"""Starting data-parallel processes: under ``torchrun``, or locally for tests and benchmarks.

Under ``torchrun`` (one process per GPU, or several CPU processes)::

    torchrun --nproc-per-node=4 train.py

and in ``train.py``::

    comm = fprecond.distributed.init_from_env()      # NCCL when CUDA is available, else gloo
    with fprecond.distributed.propagate_failures(comm):
        ...                                           # the training loop

:func:`launch` runs a function in ``world_size`` fresh local processes joined in
a gloo group (a ``FileStore`` in a temporary folder, one torch thread each) and
returns what each returned. A rank that raises leaves its error in the store,
so the others stop at their next collective with a
:class:`~fprecond.distributed.PeerFailure` naming it. A rank that hangs makes
the others' collectives fail after ``collective_timeout`` seconds (a
``PeerFailure`` saying that the collective timed out). Once a rank has failed,
the others get ``max(collective_timeout, 2 s) + 0.5 s`` to finish or fail on
their own (every collective with the failed rank fails by then); ranks still
running then are hung and are killed, as are all ranks still running after
``timeout`` seconds. Either way :class:`LaunchError` reports every rank's error,
the first failure first, and the ranks killed; no launched process outlives
:func:`launch`.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from fprecond._validation import check_choice, check_number, check_positive_int
from fprecond.distributed.collectives import (_FAILURE_GRACE_S, DEFAULT_BUCKET_BYTES, Communicator, PeerFailure,
                                              propagate_failures)

__all__ = ["init_from_env", "launch", "LaunchError", "TORCHRUN_VARIABLES"]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The environment variables ``torchrun`` sets and :func:`init_from_env` reads."""


class LaunchError(RuntimeError):
    """One or more launched processes failed or timed out.

    Attributes:
        errors: rank -> its error (type, message and traceback), for the ranks that failed.
        timed_out: the ranks still running at the deadline (killed).
        hung: the ranks still running well after another rank failed (killed).
    """

    def __init__(self, message: str, errors: dict[int, str], timed_out: Sequence[int] = (),
                 hung: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.errors = errors
        self.timed_out = tuple(timed_out)
        self.hung = tuple(hung)


def _default_store() -> Any:
    """The store of the default process group, where failing ranks leave their errors;
    None where this version of torch does not expose it."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # pragma: no cover - only the failure messages get less specific
        return None


def init_from_env(backend: str | None = None, *, timeout: float = 1800.0,
                  bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Communicator:
    """Join the process group ``torchrun`` describes and return its :class:`Communicator`.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``LOCAL_RANK`` to
    pick this process's GPU for NCCL). A group already initialised is used as it is.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, gloo otherwise.
        timeout: seconds a collective may wait for the other ranks before it fails.
        bucket_bytes: the largest buffer of one collective.
    """
    if not dist.is_available():
        raise RuntimeError("init_from_env: this build of torch has no torch.distributed")
    if not dist.is_initialized():
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(f"init_from_env: the environment lacks {', '.join(missing)}; start the script with "
                               "torchrun (e.g. torchrun --nproc-per-node=4 train.py), which sets them")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        check_choice("init_from_env", "backend", backend, ("nccl", "gloo"))
        check_number("init_from_env", "timeout", timeout, low=0.0, low_inclusive=False)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        return Communicator.from_group(store=_default_store(), bucket_bytes=bucket_bytes, timeout=timeout)
    # A group initialised elsewhere: its timeout is not ours to know.
    return Communicator.from_group(store=_default_store(), bucket_bytes=bucket_bytes)


def _run_rank(function: Callable[..., Any], rank: int, world_size: int, folder: str, args: tuple[Any, ...],
              collective_timeout: float, threads: int) -> None:
    """One launched process: join the group, run ``function``, leave a result or an error file."""
    torch.set_num_threads(threads)
    store = dist.FileStore(os.path.join(folder, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    communicator = Communicator.from_group(store=store, timeout=collective_timeout)
    try:
        with propagate_failures(communicator):
            result = function(communicator, *args)
        torch.save(result, os.path.join(folder, f"result-{rank}.pt"))
    except BaseException as error:  # reported through the error file; the exit status says it failed
        Path(folder, f"error-{rank}.json").write_text(json.dumps({
            "type": type(error).__name__, "message": str(error), "peer": isinstance(error, PeerFailure),
            "traceback": "".join(traceback.format_exception(error))}))
        sys.exit(1)
    finally:
        dist.destroy_process_group()


def _read_error(folder: str, rank: int, exitcode: int | None) -> tuple[str, bool]:
    """``(text, caused by a peer)`` of a failed rank."""
    path = Path(folder, f"error-{rank}.json")
    if not path.exists():
        return f"exited with status {exitcode} without reporting an error", False
    record = json.loads(path.read_text())
    return f"{record['type']}: {record['message']}\n{record['traceback']}", bool(record["peer"])


def _context(function: Callable[..., Any]) -> Any:
    """A fork server where there is one (else spawn): it imports torch (with the
    ``torch._dynamo`` that ``torch.func`` loads on first use, seconds of start-up) and
    fprecond once, and forks every process from there, instead of each one
    importing them again. It is started with the first launch and reused after."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    modules = ["torch", "torch._dynamo", "torch.distributed", "fprecond", "fprecond.distributed"]
    if getattr(function, "__module__", "__main__") != "__main__":
        modules.append(function.__module__)
    context.set_forkserver_preload(modules)
    return context


def launch(function: Callable[..., Any], world_size: int, *, args: Sequence[Any] = (), timeout: float = 120.0,
           collective_timeout: float = 30.0, threads: int = 1) -> list[Any]:
    """Run ``function(communicator, *args)`` in ``world_size`` local gloo processes.

    Args:
        function: a module-level function (it is imported by name in each process);
            it gets a :class:`Communicator` of the world group and returns tensors or
            plain containers of them and of numbers and strings (saved with ``torch.save``).
        world_size: the number of processes.
        args: more arguments for ``function`` (picklable).
        timeout: seconds until processes still running are killed.
        collective_timeout: seconds a collective waits for the others before failing. Once
            a rank has failed, ranks still running ``max(collective_timeout, 2) + 0.5``
            seconds later are taken to hang and are killed.
        threads: torch threads per process.

    Returns:
        The return values, by rank.

    Raises:
        LaunchError: a process failed, hung or did not finish in time; the message lists
            each failed rank's error, the ranks that failed first (not because of a peer)
            first, then the ranks that were killed.
    """
    check_positive_int("launch", "world_size", world_size)
    check_positive_int("launch", "threads", threads)
    check_number("launch", "timeout", timeout, low=0.0, low_inclusive=False)
    check_number("launch", "collective_timeout", collective_timeout, low=0.0, low_inclusive=False)
    context = _context(function)
    with tempfile.TemporaryDirectory(prefix="fprecond-launch-") as folder:
        processes = [context.Process(target=_run_rank, name=f"fprecond-rank-{rank}",
                                     args=(function, rank, world_size, folder, tuple(args), collective_timeout,
                                           threads))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        # After a failure every collective of the others fails within the collective timeout
        # (closed connection: at once, plus up to 2 s to find the failed rank's report).
        grace = max(collective_timeout, _FAILURE_GRACE_S) + 0.5
        first_failure: float | None = None
        running = list(processes)
        while running:
            limit = deadline if first_failure is None else min(deadline, first_failure + grace)
            if time.monotonic() >= limit:
                break
            multiprocessing.connection.wait([p.sentinel for p in running], timeout=limit - time.monotonic())
            running = [p for p in running if p.exitcode is None]
            if first_failure is None and any(p.exitcode not in (None, 0) for p in processes):
                first_failure = time.monotonic()
        stopped = [processes.index(p) for p in running]
        hung = stopped if first_failure is not None and first_failure + grace < deadline else []
        timed_out = [] if hung else stopped
        for process in running:
            process.kill()
        for process in processes:
            process.join()
        failed = {rank: _read_error(folder, rank, process.exitcode)
                  for rank, process in enumerate(processes) if process.exitcode != 0 and rank not in stopped}
        if failed or stopped:
            order = sorted(failed, key=lambda rank: (failed[rank][1], rank))  # first failures before their echoes
            lines = [f"rank {rank} failed: {failed[rank][0].splitlines()[0]}" for rank in order]
            if timed_out:
                lines.append(f"ranks {timed_out} were still running after {timeout:g} s and were killed")
            if hung:
                lines.append(f"ranks {hung} were still running {grace:g} s after the first failure, when every "
                             "collective with a failed rank has failed (collective_timeout "
                             f"{collective_timeout:g} s): they hung, and were killed")
            details = "\n\n".join(f"--- rank {rank} ---\n{failed[rank][0]}" for rank in order)
            raise LaunchError("\n".join(lines) + ("\n\n" + details if details else ""),
                              {rank: failed[rank][0] for rank in order}, timed_out, hung)
        return [torch.load(os.path.join(folder, f"result-{rank}.pt"), weights_only=True)
                for rank in range(world_size)]
