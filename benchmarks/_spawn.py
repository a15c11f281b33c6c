"""Spawned gloo ranks for the distributed benchmarks: file rendezvous (no port), loopback only,
``os._exit`` at the end of each rank, a deadline for the whole group."""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["spawn_by_world", "spawn_configs"]


def _worker(
    rank: int,
    world: int,
    rank_fn: Callable[[int, Any], Any],
    cfgs: Sequence[Any],
    threads: int,
    timeout: float,
    init_file: str,
    conn: Any,
) -> None:
    code = 1
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo talks over 127.0.0.1 only
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        dist.init_process_group(
            "gloo",
            init_method="file://" + init_file,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        results = [rank_fn(rank, cfg) for cfg in cfgs]
        conn.send_bytes(pickle.dumps(("ok", results)))
        code = 0
    except BaseException:
        try:
            conn.send_bytes(pickle.dumps(("err", traceback.format_exc())))
        except BaseException:
            pass
    finally:
        # No destroy_process_group(): with gloo the process group's destructor runs under the GIL while
        # its worker threads may need it, which can deadlock or abort the exit (pytorch#56297).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def spawn_configs(
    rank_fn: Callable[[int, Any], Any],
    cfgs: Sequence[Any],
    world: int,
    *,
    timeout: float,
    threads: int = 1,
    prefix: str = "gradvac_bench_",
) -> list[list[Any]]:
    """Runs ``rank_fn(rank, cfg)`` for each configuration, one after the other, in ONE group of
    ``world`` spawned gloo ranks (one start-up for all); returns, per configuration, every rank's
    result. ``rank_fn`` must be a module-level function; a failing or silent rank raises."""
    if not cfgs:
        raise ValueError("spawn_configs needs at least one configuration")
    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix=prefix)
    procs, conns = [], {}
    try:
        for rank in range(world):
            recv, send = ctx.Pipe(duplex=False)
            args = (rank, world, rank_fn, list(cfgs), threads, timeout, os.path.join(tmp, "rendezvous"), send)
            proc = ctx.Process(target=_worker, args=args, daemon=True)
            proc.start()
            send.close()
            procs.append(proc)
            conns[recv] = rank
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while conns:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"benchmark ranks {sorted(conns.values())} did not finish in {timeout:g} s")
            for conn in multiprocessing.connection.wait(list(conns), timeout=left):
                rank = conns.pop(conn)
                try:
                    kind, value = pickle.loads(conn.recv_bytes())
                except EOFError:
                    kind, value = "err", f"rank {rank} died without a result (exit code {procs[rank].exitcode})"
                if kind != "ok":
                    raise RuntimeError(f"benchmark rank {rank} failed:\n{value}")
                results[rank] = value
        return [[results[r][i] for r in range(world)] for i in range(len(cfgs))]
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


def spawn_by_world(
    rank_fn: Callable[[int, Any], Any],
    cfgs: Sequence[Any],
    *,
    threads: Callable[[int], int],
    prefix: str,
) -> tuple[list[list[Any]], dict[int, float]]:
    """:func:`spawn_configs` for configurations of several world sizes (each has ``world`` and
    ``timeout`` attributes): one group of ``world`` ranks per size, in first-seen order, with
    ``threads(world)`` threads each and the summed timeouts of its configurations as its deadline.

    Returns every rank's result per configuration, in the order of ``cfgs``, and each group's wall
    time in seconds, by world size.
    """
    results: list[list[Any]] = [[] for _ in cfgs]
    seconds: dict[int, float] = {}
    for world in dict.fromkeys(c.world for c in cfgs):
        indices = [i for i, c in enumerate(cfgs) if c.world == world]
        group = [cfgs[i] for i in indices]
        timeout = sum(c.timeout for c in group)
        start = time.monotonic()
        raw = spawn_configs(rank_fn, group, world, timeout=timeout, threads=threads(world), prefix=prefix)
        seconds[world] = time.monotonic() - start
        for i, per_rank in zip(indices, raw):
            results[i] = per_rank
    return results, seconds
