"""Run a function on several gloo ranks, each in its own process, and collect the results.

    from tests.distributed.harness import run_distributed

    def _body(rank, world_size, scale):        # module level, so it pickles
        t = torch.full((2,), float(rank) * scale)
        dist.all_reduce(t)
        return t

    results = run_distributed(_body, 2, 3.0, timeout=30)   # [tensor, tensor], by rank

Design choices (see the design notes, torch-distributed-facts.md, "Test-harness traps"):

* Processes come from the ``spawn`` context: no forked torch/OpenMP state, safe under pytest-xdist.
* Rendezvous is ``init_method="file://<fresh temp dir>/rendezvous"``: no ports, so parallel tests
  cannot race for one. Gloo is pinned to the loopback interface (``GLOO_SOCKET_IFNAME``) unless the
  caller's environment already chooses one.
* ``fn``, its arguments and every rank's return value travel as plain ``pickle`` bytes (tensors are
  copied), never through torch's shared-memory reducers, which need the sending process to stay
  alive after it has sent.
* Each worker ends with ``os._exit``, after flushing stdout/stderr and destroying the process group:
  this sidesteps the rare SIGABRT during interpreter shutdown after ``destroy_process_group()``.
  A rank whose result arrived counts as passed even if its process dies on the way out.
* The parent never hangs: one deadline covers start-up, the run and the exit. On timeout it dumps
  the Python stacks of the ranks still running (faulthandler, SIGUSR1), kills every worker and
  raises ``DistributedTimeoutError``. When a rank fails, the others get ``grace`` seconds to finish
  (they are often blocked in a collective with the dead rank) before they are killed; then
  ``DistributedRankError`` is raised with every failing rank's traceback.
* Each worker also watches its parent: if the parent disappears, or the deadline is long past, the
  worker exits on its own, so a killed pytest leaves no orphans spinning on the 2 CPU cores.
"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = [
    "DistributedRankError",
    "DistributedTestError",
    "DistributedTimeoutError",
    "run_distributed",
]

_OK = "ok"
_ERR = "err"


class DistributedTestError(AssertionError):
    """Base class: a multi-process run did not succeed on every rank."""


class DistributedRankError(DistributedTestError):
    """One or more ranks raised, or died without reporting a result."""


class DistributedTimeoutError(DistributedTestError):
    """The run did not finish within ``timeout`` seconds; every worker was killed."""


# --------------------------------------------------------------------------------------------
# Worker side (runs in the spawned process)
# --------------------------------------------------------------------------------------------


def _start_watchdog(parent_pid: int, hard_deadline_s: float) -> None:
    """Exit this worker if the parent goes away or long after the deadline has passed."""

    def watch() -> None:
        end = time.monotonic() + hard_deadline_s
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid or time.monotonic() > end:
                try:
                    sys.stderr.write("[harness] worker watchdog: parent gone or deadline passed; exiting\n")
                    sys.stderr.flush()
                finally:
                    os._exit(3)

    threading.Thread(target=watch, name="harness-watchdog", daemon=True).start()


def _send(conn, kind: str, payload: Any) -> None:
    try:
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        if kind == _OK:
            kind, payload = (
                _ERR,
                (
                    "rank result could not be pickled (return picklable values: tensors, numbers, "
                    "lists, dicts...):\n" + traceback.format_exc()
                ),
            )
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    conn.send_bytes(data)


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    stack_file: str,
    payload: bytes,
    conn,
    parent_pid: int,
    timeout: float,
    backend: str,
) -> None:
    exit_code = 1
    stack_fh = None
    try:
        _start_watchdog(parent_pid, timeout + 30.0)
        try:  # stacks of a hung rank, written when the parent sends SIGUSR1 on timeout
            import faulthandler

            stack_fh = open(stack_file, "w")
            faulthandler.register(signal.SIGUSR1, file=stack_fh, all_threads=True)
        except Exception:
            pass
        for key, value in (
            ("RANK", rank),
            ("LOCAL_RANK", rank),
            ("WORLD_SIZE", world_size),
            ("LOCAL_WORLD_SIZE", world_size),
        ):
            os.environ[key] = str(value)
        if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass

        try:
            fn, args, kwargs = pickle.loads(payload)
            dist.init_process_group(
                backend,
                init_method="file://" + init_file,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=max(float(timeout), 1.0)),
            )
            result = fn(rank, world_size, *args, **kwargs)
        except BaseException:
            _send(conn, _ERR, traceback.format_exc())
        else:
            _send(conn, _OK, result)
            exit_code = 0
        try:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except BaseException:
            pass
    except BaseException:  # harness failure before/around the user function
        try:
            _send(conn, _ERR, "harness worker failure:\n" + traceback.format_exc())
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr, stack_fh):
            try:
                if stream is not None:
                    stream.flush()
            except BaseException:
                pass
        os._exit(exit_code)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _kill_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            try:
                p.kill()
            except Exception:
                pass
    for p in procs:
        p.join(timeout=5)


def _read_stack(path: str) -> str:
    try:
        with open(path) as fh:
            text = fh.read().strip()
        return text or "(no stack dumped)"
    except OSError:
        return "(no stack dumped)"


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    grace: float = 5.0,
    backend: str = "gloo",
    expect_dead: frozenset[int] = frozenset(),
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` fresh gloo ranks.

    ``fn`` must be a module-level function (it is pickled into spawned processes); ``args``,
    ``kwargs`` and every rank's return value must be picklable (tensors are fine). Returns the
    results ordered by rank. Raises ``DistributedRankError`` (an ``AssertionError``) with the
    traceback of every failing rank, or ``DistributedTimeoutError`` (also an ``AssertionError``)
    with the stacks of the ranks still running after ``timeout`` seconds (start-up included).
    ``grace``: how long the other ranks may keep running after one rank failed.
    ``expect_dead``: ranks that are meant to die without reporting (fault-injection tests); their
    result is ``None`` and their death is not a failure.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"run_distributed: fn must be a module-level function and args/kwargs picklable (fn={fn!r}): {exc}"
        ) from exc

    ctx = multiprocessing.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="gradvac_dist_harness_")
    init_file = os.path.join(tmpdir, "rendezvous")  # must not exist yet: a fresh FileStore
    deadline = time.monotonic() + timeout
    procs: list = []
    readers: dict = {}  # connection -> rank
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_worker,
                args=(
                    rank,
                    world_size,
                    init_file,
                    os.path.join(tmpdir, f"stack_rank{rank}.txt"),
                    payload,
                    send_end,
                    os.getpid(),
                    float(timeout),
                    backend,
                ),
                name=f"dist-rank{rank}",
                daemon=False,
            )
            p.start()
            send_end.close()  # the parent keeps only the read end: EOF once the worker is gone
            procs.append(p)
            readers[recv_end] = rank

        fail_deadline = None
        while readers:
            now = time.monotonic()
            limit = deadline if fail_deadline is None else min(deadline, fail_deadline)
            if now >= limit:
                break
            ready = multiprocessing.connection.wait(list(readers), timeout=limit - now)
            for conn in ready:
                rank = readers.pop(conn)
                try:
                    kind, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    procs[rank].join(timeout=2)
                    if rank in expect_dead:
                        results[rank] = None
                        conn.close()
                        continue
                    kind, value = (
                        _ERR,
                        (
                            f"rank {rank} exited without reporting a result "
                            f"(exit code {procs[rank].exitcode}; negative = killed by that signal)"
                        ),
                    )
                except Exception:
                    kind, value = _ERR, "could not unpickle the rank's message:\n" + traceback.format_exc()
                conn.close()
                if kind == _OK:
                    results[rank] = value
                else:
                    errors[rank] = value
                    if fail_deadline is None:
                        fail_deadline = time.monotonic() + grace

        pending = sorted(readers.values())
        if pending and not errors:  # timed out with no failure reported: dump stacks, then kill
            for rank in pending:
                p = procs[rank]
                if p.is_alive() and p.pid is not None:
                    try:
                        os.kill(p.pid, signal.SIGUSR1)
                    except OSError:
                        pass
            time.sleep(0.5)
            _kill_all(procs)
            stacks = "\n".join(
                f"--- rank {r} stack at timeout ---\n{_read_stack(os.path.join(tmpdir, f'stack_rank{r}.txt'))}"
                for r in pending
            )
            done = sorted(results)
            raise DistributedTimeoutError(
                f"run_distributed({getattr(fn, '__qualname__', fn)}, world_size={world_size}) timed "
                f"out after {timeout:g}s: ranks {pending} still running (killed); ranks {done} "
                f"finished.\n{stacks}"
            )
        if errors:
            _kill_all(procs)
            parts = [f"--- rank {r} failed ---\n{errors[r].rstrip()}" for r in sorted(errors)]
            if pending:
                parts.append(f"ranks {pending} were still running {grace:g}s after the failure (killed)")
            raise DistributedRankError(
                f"run_distributed({getattr(fn, '__qualname__', fn)}, world_size={world_size}): "
                f"{len(errors)} rank(s) failed\n" + "\n".join(parts)
            )
        # Every rank reported success: let the processes exit (os._exit right after the send).
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        return [results[r] for r in range(world_size)]
    finally:
        _kill_all(procs)
        for conn in readers:
            conn.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
