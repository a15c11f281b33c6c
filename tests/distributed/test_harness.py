"""Tests of the multi-process harness itself (2 gloo ranks, a few seconds each)."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import (
    DistributedRankError,
    DistributedTimeoutError,
    run_distributed,
)


def _identity(rank, world_size, tag, *, scale=1.0):
    return {
        "rank": rank,
        "world_size": world_size,
        "dist_rank": dist.get_rank(),
        "backend": dist.get_backend(),
        "threads": torch.get_num_threads(),
        "tag": tag,
        "tensor": torch.arange(3, dtype=torch.float32) * scale + rank,
    }


def _all_reduce(rank, world_size):
    t = torch.full((1000,), float(rank + 1))
    dist.all_reduce(t)
    gathered = [torch.empty(2) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([float(rank), 7.0]))
    return t, torch.stack(gathered)


def _fail_on_rank1(rank, world_size):
    dist.barrier()
    if rank == 1:
        raise ValueError("boom from rank one")
    return rank


def _fail_on_rank1_while_rank0_waits(rank, world_size):
    if rank == 1:
        raise KeyError("rank one died before the collective")
    t = torch.ones(4)
    dist.all_reduce(t)  # never matched: rank 1 is gone
    return t


def _hang_on_rank1(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


def _not_picklable_result(rank, world_size):
    return lambda: rank


def test_results_come_back_ordered_by_rank():
    out = run_distributed(_identity, 2, "hello", scale=2.0, timeout=60)
    assert [r["rank"] for r in out] == [0, 1]
    assert [r["dist_rank"] for r in out] == [0, 1]
    assert all(r["world_size"] == 2 and r["tag"] == "hello" for r in out)
    assert all(r["backend"] == "gloo" and r["threads"] == 1 for r in out)
    torch.testing.assert_close(out[1]["tensor"], torch.tensor([1.0, 3.0, 5.0]))


def test_all_reduce_and_all_gather():
    out = run_distributed(_all_reduce, 2, timeout=60)
    for summed, gathered in out:
        assert torch.equal(summed, torch.full((1000,), 3.0))
        assert torch.equal(gathered, torch.tensor([[0.0, 7.0], [1.0, 7.0]]))


def test_exception_on_rank1_reported_with_traceback():
    with pytest.raises(DistributedRankError) as info:
        run_distributed(_fail_on_rank1, 2, timeout=60)
    msg = str(info.value)
    assert isinstance(info.value, AssertionError)
    assert "rank 1 failed" in msg and "rank 0 failed" not in msg
    assert "ValueError: boom from rank one" in msg
    assert "_fail_on_rank1" in msg and "Traceback" in msg


def test_failure_while_peer_blocks_in_collective_is_reported_fast():
    start = time.monotonic()
    with pytest.raises(DistributedRankError) as info:
        run_distributed(_fail_on_rank1_while_rank0_waits, 2, timeout=60, grace=3)
    assert "KeyError" in str(info.value) and "rank 1 failed" in str(info.value)
    assert time.monotonic() - start < 30


def test_hang_is_caught_by_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTimeoutError) as info:
        run_distributed(_hang_on_rank1, 2, timeout=6)
    elapsed = time.monotonic() - start
    assert 6 <= elapsed < 15, elapsed
    msg = str(info.value)
    assert "timed out after 6s" in msg and "still running" in msg
    assert "rank 1 stack at timeout" in msg and "_hang_on_rank1" in msg  # where it hung


def test_unpicklable_function_or_result_fails_clearly():
    with pytest.raises(TypeError, match="module-level"):
        run_distributed(lambda rank, ws: rank, 2)
    with pytest.raises(DistributedRankError, match="could not be pickled"):
        run_distributed(_not_picklable_result, 2, timeout=60)
