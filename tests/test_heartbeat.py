"""heartbeat.PeerWatch under train.py: two ranks as separate processes (as ranks on another node
see each other: no local torchrun agent to stop them). A rank that is killed, hangs or stops with
an error stops the other within seconds, with one line naming what happened, instead of after the
process-group timeout.

Everything runs on CPU (gloo) with a tiny ViT on synthetic data.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import heartbeat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))  # synthetic files, shared by the tests


VIT = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--train-per-class", "4",
       "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "44", "--dataset",
       "synthetic", "--device", "cpu", "--model", "vit", "--distill", "none", "--epochs", "1000",
       "--log-interval", "1"]


def _kill_group(p):
    try:
        # only if the test failed half way: no stray run keeps going
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("victim,sig",
                         [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
                         ids=["rank1-killed", "rank0-killed", "rank1-hung"])
def test_rank_killed_without_agent_survivor_names_it(tmp_path, data_dir, victim, sig):
    """The same with each rank a separate process (as ranks on another node see it: no local agent
    to stop them): the survivor stops within seconds with one line naming what died. SIGSTOP is a
    rank that hangs: no connection closes, the survivor's collective would wait out the 60-minute
    process-group timeout (as NCCL does for a dead peer); the heartbeat stops it instead."""
    port, ps = _free_port(), []
    for r in range(2):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   LOCAL_RANK=str(r),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        cmd = [sys.executable, "train.py", *VIT, "--data-dir", data_dir, "--out-dir",
               str(tmp_path / "o")]
        ps.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env, start_new_session=True))
    try:
        t_kill = None
        for line in ps[0].stdout:
            if line.startswith("step 12/"):
                ps[victim].send_signal(sig)
                t_kill = time.time()
                break
        survivor = ps[1 - victim]
        err = survivor.communicate(timeout=120)[1]
        stopped = time.time() - t_kill
    finally:
        for q in ps:
            _kill_group(q)
            q.communicate(timeout=30)
    print(f"\nrank {victim} got {sig.name}, rank {1 - victim} stopped {stopped:.1f} s later: "
          f"{err.splitlines()[-1]}")
    assert survivor.returncode == 1 and stopped < 30, err[-3000:]
    last = err.strip().splitlines()[-1]
    if victim == 1:
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert re.fullmatch(r"error: rank 0: rank 1 stopped responding \d+s ago \(killed, hung, "
                            r"crashed or its machine lost\); the last checkpoint \S+ckpt\.pt is "
                            r"kept", last), err
        # no collective failed: the full silence limit, not the short confirmation
        if sig == signal.SIGSTOP:
            assert stopped >= heartbeat.PeerWatch.DEAD_AFTER_S, stopped
    else:  # rank 0 also held the rendezvous store
        assert "Traceback" not in err
        assert re.fullmatch(r"error: rank 1: lost the rendezvous store 127\.0\.0\.1:\d+, so rank "
                            r"0 or torchrun's agent is gone \(.*\); the last checkpoint "
                            r"\S+ckpt\.pt is kept", last), err


OOM_ON_RANK_1 = """
import os, runpy, sys, torch, train
real, seen = train.train_step, [0]
def step(*a, **k):
    seen[0] += 1
    if os.environ["RANK"] == "1" and seen[0] == 12:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(*a, **k)
train.train_step = step
sys.argv = ["train.py"] + sys.argv[1:]
sys.exit(train.main())
"""


def test_out_of_memory_on_one_rank_stops_all_with_its_line(tmp_path, data_dir):
    """Rank 1 runs out of memory (no agent: separate processes): rank 1 says so with its per-GPU
    batch, rank 0 stops too and names rank 1 and the reason."""
    port, ps = _free_port(), []
    for r in range(2):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   LOCAL_RANK=str(r),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        cmd = [sys.executable, "-c", OOM_ON_RANK_1, *VIT, "--data-dir", data_dir, "--out-dir",
               str(tmp_path / "o")]
        ps.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env, start_new_session=True))
    try:
        errs = [q.communicate(timeout=180)[1] for q in ps]
    finally:
        for q in ps:
            _kill_group(q)
    print(f"\nrank 0: {errs[0].strip()}\nrank 1: {errs[1].strip()}")
    assert [q.returncode for q in ps] == [1, 1], errs
    ckpt = re.escape(str(tmp_path / "o" / "ckpt.pt"))
    assert re.fullmatch(r"error: rank 1: out of GPU memory on cpu at 22 images per GPU "
                        r"\(--batch-size 44 over 2 processes\): use a smaller --batch-size "
                        r"\(e\.g\. 22\) in a new --out-dir \(--resume needs the same flags\); "
                        rf"the last checkpoint {ckpt} is kept\n", errs[1]), errs[1]
    assert re.fullmatch(r"error: rank 0: rank 1 stopped with an error \(out of GPU memory on cpu "
                        r"at 22 images per GPU \(--batch-size 44 over 2 processes\)\); "
                        rf"the last checkpoint {ckpt} is kept\n", errs[0]), errs[0]
