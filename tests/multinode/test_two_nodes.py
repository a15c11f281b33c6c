"""Two nodes on this machine: two network namespaces joined by a veth pair (198.18.0.0/15 only),
``launch/two_nodes.sh`` running ``launch/multinode.sh`` (the command users run on real nodes) in
each, torchrun's c10d rendezvous and gloo across the link. DDP (2 nodes x 1 rank, 2 x 2) and FSDP2
(2 x 1) must give ``.grad`` equal to GradVac on the rank-mean task gradients (the distributed
suite's equivalence bodies, reference from the formulas), identical on every rank.

Every launch has a deadline (``--timeout`` inside, a wait bound here), and the namespaces are
removed whatever happens. Where namespaces cannot be made (not root, no ``ip``), the tests skip
and say why.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 150  # a job takes 15-40 s here; the bound only keeps a hung job from blocking CI
_runs = itertools.count()


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "two-node tests need root (they create network namespaces); run the suite as root"
    if shutil.which("ip") is None:
        return "two-node tests need iproute2's `ip` (apt install iproute2)"
    probe = f"gvprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def namespaces_work():
    why = _why_not()
    if why is not None:
        pytest.skip(why)


def _remove_namespaces(tag: str) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in (f"{tag}n0", f"{tag}n1"):
        if name in listed:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class TwoNodes:
    """One ``launch/two_nodes.sh`` job, started in the background; :meth:`finish` waits for it (with a
    bound), always removes its namespaces, and returns its exit status and output."""

    def __init__(
        self,
        tmp_path: Path,
        job_args: list[str],
        nproc: int,
        script: str = "tests/multinode/job.py",
        rate: str | None = None,
        **env: str,
    ) -> None:
        self.tag = f"gvt{os.getpid() % 10000}{next(_runs)}"  # namespace names <= 15 characters
        self.out, self.logs = tmp_path / "out", tmp_path / "logs"
        self.node_namespaces = (f"{self.tag}n0", f"{self.tag}n1")
        full_env = dict(os.environ, SCRIPT=script, GRADVAC_NS_TAG=self.tag, RDZV_ID=self.tag)
        full_env.update(OMP_NUM_THREADS="1", **env)
        cmd = ["bash", "launch/two_nodes.sh", "--nproc", str(nproc), "--timeout", str(JOB_TIMEOUT_S)]
        cmd += ["--rate", rate] if rate else []
        out_flag = "--out" if script.startswith("tests/") else "--checkpoint"
        cmd += ["--logs", str(self.logs), "--", *job_args, out_flag, str(self.out)]
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.log = open(tmp_path / "two_nodes.log", "w+")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def finish(self) -> tuple[int | None, str]:
        try:
            rc: int | None = self.proc.wait(timeout=JOB_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGTERM)  # two_nodes.sh's trap removes what it made
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
            rc = None
        finally:
            _remove_namespaces(self.tag)
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return rc, text + "".join(
            f"\n--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("node*.log"))
        )

    def pids(self, node: int) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.node_namespaces[node]], capture_output=True, text=True)
        return [int(p) for p in listed.stdout.split()]


def run_two_nodes(tmp_path: Path, body: str, configs: list[dict], nproc: int, rate: str | None = None) -> list[dict]:
    """Runs ``tests/multinode/job.py --body body`` on two namespaces; returns every rank's result, by rank."""
    job = TwoNodes(tmp_path, ["--body", body, "--configs", json.dumps(configs)], nproc, rate=rate)
    rc, text = job.finish()
    assert rc == 0, f"two_nodes.sh exited {rc}:\n{text[-6000:]}"
    if rate:
        assert f", {rate}; logs in" in text, text[:500]  # the link was rate-limited with tbf
    world = 2 * nproc
    saved = [torch.load(job.out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert all(s["world"] == world for s in saved)
    assert sorted({s["node"] for s in saved}) == [0, 1], "the ranks must sit on both nodes"
    return [s["result"] for s in saved]


def _wait_for_step(progress: Path, step: int, job: TwoNodes, bound: float = 90.0) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if progress.exists() and any(int(line.split()[0]) >= step for line in progress.read_text().split("\n") if line):
            return
        if job.proc.poll() is not None:
            break
        time.sleep(0.05)
    rc, text = job.finish()
    raise AssertionError(f"the job did not reach step {step} (exit {rc}):\n{text[-6000:]}")


DDP_CONFIGS = [
    {"grouping": "module", "strategy": "sharded", "steps": 3},
    {"grouping": "parameter", "strategy": "replicated", "steps": 3},
]


@pytest.mark.parametrize(
    ("nproc", "rate"), [(1, None), (2, None), (1, "200mbit")], ids=["2x1", "2x2", "2x1 on a 200 Mbit/s link"]
)
def test_ddp_across_two_nodes_is_exact(namespaces_work, tmp_path, nproc, rate):
    results = run_two_nodes(tmp_path, "ddp", DDP_CONFIGS, nproc, rate)
    for c, cfg in enumerate(DDP_CONFIGS):
        first = results[0][c]
        for res in (r[c] for r in results):
            assert res["max_rel_err"] < 1e-10, (cfg, res["max_rel_err"])
            assert res["step"] == cfg["steps"]
            assert torch.equal(res["params"], first["params"]), cfg  # every rank bit-identical
            assert torch.equal(res["targets"], first["targets"]) and torch.equal(res["generator"], first["generator"])


FSDP_CONFIGS = [{"grouping": "module", "raf": True, "steps": 3}, {"grouping": "whole", "raf": False, "steps": 3}]


@pytest.mark.skipif(not hasattr(torch.cpu.Stream, "record_event"), reason="FSDP2 on a CPU mesh needs torch 2.7+")
def test_fsdp2_across_two_nodes_is_exact(namespaces_work, tmp_path):
    results = run_two_nodes(tmp_path, "fsdp", FSDP_CONFIGS, 1)
    for c, cfg in enumerate(FSDP_CONFIGS):
        first = results[0]["configs"][c]
        for res in (r["configs"][c] for r in results):
            assert res["max_rel_err"] < 1e-10, (cfg, res["max_rel_err"])
            assert torch.allclose(res["params"], res["ref_params"], atol=1e-10, rtol=0), cfg
            assert res["placements_ok"], cfg
            assert torch.equal(res["targets"], first["targets"]), cfg


@pytest.mark.skipif(not hasattr(torch.cpu.Stream, "record_event"), reason="FSDP2 on a CPU mesh needs torch 2.7+")
def test_hsdp_across_two_nodes_is_exact(namespaces_work, tmp_path):
    """HSDP with the mesh nodes x ranks per node: replicate across the nodes, shard within each."""
    configs = [{"grouping": "module", "raf": True, "hsdp": [2, 2], "steps": 2}]
    results = run_two_nodes(tmp_path, "fsdp", configs, 2)
    first = results[0]["configs"][0]
    for res in (r["configs"][0] for r in results):
        assert res["max_rel_err"] < 1e-10, res["max_rel_err"]
        assert torch.allclose(res["params"], res["ref_params"], atol=1e-10, rtol=0)
        assert torch.equal(res["params"], first["params"]) and torch.equal(res["targets"], first["targets"])


ELASTIC = "examples/elastic_train.py"
TRAIN = ["--steps", "8", "--ckpt-every", "2", "--step-sleep", "0.3"]


def _final(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"final_rank{r}.pt", weights_only=True) for r in range(world)]


def test_a_node_that_dies_makes_the_other_raise_promptly_and_leaves_no_half_written_checkpoint(
    namespaces_work, tmp_path
):
    job = TwoNodes(tmp_path, TRAIN, 1, ELASTIC)
    _wait_for_step(job.out / "progress", 3, job)
    killed_at = time.monotonic()
    for pid in job.pids(1):  # node 1 dies: its torchrun agent and its worker, at once
        os.kill(pid, signal.SIGKILL)
    rc, text = job.finish()
    seconds = time.monotonic() - killed_at
    assert rc not in (0, None), f"node 0 did not fail after node 1 died (exit {rc}):\n{text[-4000:]}"
    # gloo names the peer it lost (node 1's address on the link); well within the process-group timeout
    node0 = (job.logs / "node0.log").read_text()
    lost = [line for line in node0.splitlines() if "by peer [198.18.0.2]" in line]
    assert lost and ("Connection closed" in lost[0] or "Connection reset" in lost[0]), node0[-4000:]
    assert seconds < 60, f"node 0 took {seconds:.1f} s to stop"
    print(f"node 0 stopped {seconds:.1f} s after node 1 was killed")
    # a checkpoint is there whole or not at all: never a temporary file left as the checkpoint
    saved = torch.load(job.out / "checkpoint.pt", weights_only=True)
    assert saved["step"] >= 2 and saved["step"] % 2 == 0, saved["step"]


def test_an_elastic_restart_resumes_from_the_last_checkpoint_bit_for_bit(namespaces_work, tmp_path):
    reference = TwoNodes(tmp_path / "uninterrupted", TRAIN, 1, ELASTIC)
    rc, text = reference.finish()
    assert rc == 0, text[-6000:]
    job = TwoNodes(tmp_path / "restarted", TRAIN, 1, ELASTIC, MAX_RESTARTS="1")
    _wait_for_step(job.out / "progress", 3, job)
    killed = _kill_worker(job, 1)
    rc, text = job.finish()
    assert killed, "found no worker to kill on node 1"
    assert rc == 0, f"the restarted job failed (exit {rc}):\n{text[-6000:]}"
    expected, got = _final(reference.out, 2), _final(job.out, 2)
    for r in range(2):
        assert got[r]["resumed_from"] >= 2, "the workers did not restart from a checkpoint"
        assert torch.equal(got[r]["params"], expected[r]["params"]), "the resumed weights differ"
        for key, value in expected[r]["gradvac"].items():
            same = (
                torch.equal(value, got[r]["gradvac"][key])
                if isinstance(value, torch.Tensor)
                else value == got[r]["gradvac"][key]
            )
            assert same, f"GradVac state {key!r} differs after the restart"


def _kill_worker(job: TwoNodes, node: int) -> bool:
    """Kills one training worker of ``node`` (a process running job.py, not torchrun's agent)."""
    for pid in job.pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(ELASTIC.encode()) for part in cmdline) and not any(
            b"torchrun" in part or b"torch.distributed.run" in part for part in cmdline
        ):
            os.kill(pid, signal.SIGKILL)
            return True
    return False


def test_a_two_node_job_resumes_on_one_node(namespaces_work, tmp_path):
    """2 nodes train 4 steps and checkpoint; 1 rank on one node resumes to step 8: the trajectory of
    8 steps on 2 nodes (to rounding: the rank mean is summed in another order)."""
    from tests.distributed.launchers import run, torchrun

    reference = TwoNodes(tmp_path / "uninterrupted", TRAIN, 1, ELASTIC)
    rc, text = reference.finish()
    assert rc == 0, text[-6000:]
    first = TwoNodes(tmp_path / "resized", ["--steps", "4", "--ckpt-every", "2"], 1, ELASTIC)
    rc, text = first.finish()
    assert rc == 0, text[-6000:]
    output = run([*torchrun(1), ELASTIC, *TRAIN, "--checkpoint", str(first.out)], tmp_path)
    assert "resumed from step 4 on 1 ranks" in output, output
    expected, (got,) = _final(reference.out, 2)[0], _final(first.out, 1)
    assert got["resumed_from"] == 4 and got["world"] == 1
    assert torch.allclose(got["params"], expected["params"], atol=1e-12, rtol=0)
    assert got["gradvac"]["step"] == expected["gradvac"]["step"] == 8
    assert torch.equal(got["gradvac"]["generator_state"], expected["gradvac"]["generator_state"])
    assert torch.allclose(got["gradvac"]["targets"], expected["gradvac"]["targets"], atol=1e-12, rtol=0)
