"""Two nodes without a shared disk: two torchrun agents on this machine (c10d rendezvous, gloo,
CPU), each started in its own folder with its own ./data and ./out, a tiny student on synthetic
data. The agent given --local-addr 127.0.0.1 sorts first in the rendezvous, so it is node 0 and
holds rank 0; the other (--local-addr localhost) is node 1."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()
TINY = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--train-per-class", "4",
        "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "44", "--head-epochs", "2",
        "--dataset", "synthetic", "--device", "cpu", "--model", "cdeit", "--distill", "hard",
        "--log-interval", "1", "--data-dir", "./data", "--out-dir", "./out"]  # 10 steps per epoch
ADDRS = ["127.0.0.1", "localhost"]  # node 0, node 1 (the rendezvous sorts its members by address)
# train.py stopped after STOP_AT steps (as a SIGTERM would stop it): a mid-epoch checkpoint
STOPPING = """import os, sys
sys.path.insert(0, {root!r})
import train
sys.exit(train.main(sys.argv[1:], stop_at_step=int(os.environ["STOP_AT"])))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(folders, argv, script=None, env=None):
    """One torchrun agent per folder (node i in folders[i]), output to <folder>/node<i>.log;
    node 1's starts once node 0's holds the rendezvous endpoint."""
    port, ps = _free_port(), []
    for i, folder in enumerate(folders):
        os.makedirs(folder, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
               "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
               "--local-addr", ADDRS[i], script or os.path.join(ROOT, "train.py"), *argv]
        run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        with open(os.path.join(folder, f"node{i}.log"), "w") as log:
            ps.append(subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=run_env))
        if i == 0:  # node 0's agent holds the rendezvous store, as the endpoint's host does
            _listening(port)
    return ps


def _listening(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


def _wait(ps, timeout=240):
    """Wait for every agent; kill the rest on a timeout. Returns the exit codes."""
    try:
        deadline = time.time() + timeout
        return [p.wait(timeout=max(1, deadline - time.time())) for p in ps]
    finally:
        for p in ps:
            _kill(p)


def _tree(pid):
    """pid and its descendants (torchrun starts its workers in sessions of their own)."""
    parent = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    out = [pid]
    for p in out:
        out += [c for c, pp in parent.items() if pp == p]
    return out


def _kill(p):
    """SIGKILL an agent and its workers, as a lost machine would stop them."""
    for pid in _tree(p.pid) if p.poll() is None else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _log(folder):
    """What the agents started in folder printed (both, for the shared folder)."""
    out = ""
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".log")):
        with open(os.path.join(folder, name)) as f:
            out += f.read()
    return out


def _errors(folder):
    return [line for line in _log(folder).splitlines() if re.match(r"(train\.py: )?error: ", line)]


def _weights(folder, name="ckpt.pt"):
    return torch.load(os.path.join(folder, "out", name), map_location="cpu", weights_only=True)


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder)
                  for f in fs if not f.endswith(".log") and not f.startswith("."))


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The reference: the same two-node run with one shared folder (both agents in it), 2 epochs."""
    folder = str(tmp_path_factory.mktemp("shared"))
    codes = _wait(_launch([folder, folder], TINY + ["--epochs", "2"]))
    assert codes == [0, 0], _log(folder)[-3000:]
    return folder


def test_own_folders_resume_from_rank0_only_match_one_shared_folder(tmp_path, shared):
    """Each node prepares its own data folder; the teacher cache is built once and node 1 receives
    the logits and head; the run stops mid-epoch (only node 0 holds ckpt.pt), resumes, and ends
    with the weights of the run with one shared folder, bit for bit."""
    n0, n1 = str(tmp_path / "node0"), str(tmp_path / "node1")
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING.format(root=ROOT))
    ps = _launch([n0, n1], TINY + ["--epochs", "2"], script=str(script), env={"STOP_AT": "15"})
    assert _wait(ps) == [0, 0], _log(n0)[-3000:] + _log(n1)[-3000:]
    assert _weights(n0)["step"] == 15 and not os.path.exists(os.path.join(n1, "out"))
    files = _files(n1)
    assert "data/synthetic/teacher_synthetic.safetensors" in files
    assert not any(f.endswith("features_train.pt") for f in files), files  # built on node 0 only
    sent = [f for f in files if f.endswith(("logits_train.pt", "teacher_head.pt"))]
    assert len(sent) == 2, files
    for f in sent:  # written whole: the same bytes as rank 0's
        assert _bytes(os.path.join(n1, f)) == _bytes(os.path.join(n0, f))
    sent = r"teacher cache: sent logits_train\.pt, teacher_head\.pt \([\d.]+ MB\)"
    assert re.search(sent, _log(n0)), _log(n0)

    ps = _launch([n0, n1], TINY + ["--epochs", "2", "--resume"])
    assert _wait(ps) == [0, 0], _log(n0)[-3000:] + _log(n1)[-3000:]
    assert "resumed" in _log(n0) and not os.path.exists(os.path.join(n1, "out"))
    for name in ("ckpt.pt", "best.pt"):
        a, b = _weights(shared, name), _weights(n0, name)
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]), name
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    assert (_weights(n0)["epoch"], _weights(n0)["step"]) == (2, 20)
    assert [r["val_accuracy"] for r in a["history"]] == [r["val_accuracy"] for r in b["history"]]


def test_node_with_other_data_refused_naming_it(tmp_path):
    n0, n1 = str(tmp_path / "node0"), str(tmp_path / "node1")
    data.write_synthetic(os.path.join(n1, "data", "synthetic"), seed=1)  # not node 0's images
    t0 = time.time()
    codes = _wait(_launch([n0, n1], TINY + ["--epochs", "1"]), timeout=120)
    took = time.time() - t0
    assert codes[0] != 0 and codes[1] != 0 and took < 60, (codes, took)
    d0, d1 = (os.path.join(n, "data", "synthetic") for n in (n0, n1))
    line = (f"error: node 1 (host {HOST}, rank 1): its data folder {d1} differs from rank 0's "
            f"({HOST}, {d0}): ")
    for folder in (n0, n1):  # on each node's console, once
        errs = _errors(folder)
        assert len(errs) == 1 and errs[0].startswith(line), _log(folder)
        assert "data_batch_1" in errs[0], errs
        assert "[rank" not in _log(folder)  # no worker traceback standing in for the cause
    assert not os.path.exists(os.path.join(n0, "out"))


def test_rank1_flag_error_printed_by_rank1(tmp_path):
    n0, n1 = str(tmp_path / "node0"), str(tmp_path / "node1")
    os.makedirs(n1)
    open(os.path.join(n1, "data"), "w").close()  # node 1's --data-dir is a file
    t0 = time.time()
    codes = _wait(_launch([n0, n1], TINY + ["--epochs", "1"]), timeout=120)
    assert codes == [1, 1] and time.time() - t0 < 60, codes  # torchrun: a worker's exit 2 -> 1
    line = (f"train.py: error: rank 1 (host {HOST}, node 1): "
            "--data-dir ./data: is a file, not a folder")
    assert _errors(n1) == [line], _log(n1)
    assert _errors(n0) == [line], _log(n0)  # rank 0 relays it to its own console
    assert not os.path.exists(os.path.join(n0, "data"))  # stopped before any file was written


def test_node_lost_mid_epoch_other_stops_with_a_line(tmp_path):
    n0, n1 = str(tmp_path / "node0"), str(tmp_path / "node1")
    ps = _launch([n0, n1], TINY + ["--epochs", "1000", "--model", "vit", "--distill", "none"])
    try:
        deadline, t_kill = time.time() + 180, None
        while time.time() < deadline and ps[0].poll() is None:
            if "step 12/" in _log(n0):  # an epoch saved, the second under way
                _kill(ps[1])  # node 1 lost: its agent and its rank
                t_kill = time.time()
                break
            time.sleep(0.2)
        assert t_kill is not None, _log(n0)[-3000:]
        code = ps[0].wait(timeout=60)
        stopped = time.time() - t_kill
    finally:
        for p in ps:
            _kill(p)
    errs = _errors(n0)
    assert code != 0 and stopped < 30, (code, stopped, _log(n0)[-3000:])
    assert len(errs) == 1, errs
    h = re.escape(HOST)
    assert re.match(rf"error: rank 0 \(host {h}, node 0\): rank 1 \(host {h}, node 1\) stopped "
                    r"responding \d+s ago", errs[0]), errs
    assert _weights(n0)["epoch"] >= 1  # the epoch's checkpoint is intact


def test_resume_refused_when_the_nodes_checkpoints_differ(tmp_path, shared):
    """Both nodes hold a ckpt.pt, node 1's another one: one line naming node 1, on both consoles."""
    n0, n1 = str(tmp_path / "node0"), str(tmp_path / "node1")
    for n in (n0, n1):
        shutil.copytree(os.path.join(shared, "data"), os.path.join(n, "data"))
        shutil.copytree(os.path.join(shared, "out"), os.path.join(n, "out"))
    ck = _weights(n1)
    ck["best_val_accuracy"] += 0.01  # still this run's flags: only the bytes differ
    torch.save(ck, os.path.join(n1, "out", "ckpt.pt"))
    t0 = time.time()
    codes = _wait(_launch([n0, n1], TINY + ["--epochs", "2", "--resume"]), timeout=120)
    assert codes == [1, 1] and time.time() - t0 < 60, codes
    o0, o1 = (os.path.join(n, "out") for n in (n0, n1))
    line = (f"error: node 1 (host {HOST}, rank 1): its out folder {o1} differs from rank 0's "
            f"({HOST}, {o0}): ckpt.pt ")
    for folder in (n0, n1):
        errs = _errors(folder)
        assert len(errs) == 1 and errs[0].startswith(line), _log(folder)


def test_slurm_script_runs_each_task_on_several_nodes(tmp_path, monkeypatch, capsys):
    import reproduce
    script, res = tmp_path / "t.sbatch", str(tmp_path / "res")
    argv = ["table3", "--nodes", "2", "--nproc-per-node", "4", "--data-dir", "/local/data",
            "--out", res]
    assert reproduce.main(argv + ["--slurm", str(script)]) == 0
    text = script.read_text()
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --gres=gpu:4\n" in text, text
    assert "--nodes 2 --nproc-per-node 4 --data-dir /local/data" in text  # each task's reproduce.py
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    args = reproduce.get_args(argv + ["--task", "0"])
    cmd = reproduce.train_cmd(reproduce.plan(args)[0], args)
    assert cmd[:11] == ["srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-m",
                        "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4",
                        "--rdzv-backend=c10d", f"--rdzv-endpoint={HOST}:29634",
                        "--rdzv-id=cdeit-1234"], cmd
    assert cmd[cmd.index("--data-dir") + 1] == "/local/data"
    capsys.readouterr()
    assert reproduce.main(argv + ["--dry-run"]) == 2  # no Slurm allocation to spread a run over
    assert "--nodes 2: needs --slurm" in capsys.readouterr().err


SHIP = """import os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import nodes
nodes.CHUNK = 1000  # several chunks and a ragged last one
dist.init_process_group("gloo")
print(nodes.share_files(sys.argv[1], ["a.bin", "same.bin", "b.bin"], "test files"))
dist.destroy_process_group()
"""


def test_share_files_ships_what_differs_in_chunks_and_keeps_identical_copies(tmp_path):
    """Two processes as two nodes (no agent): node 1 lacks a.bin, holds another b.bin and the
    same same.bin; it receives a.bin and b.bin whole, and same.bin is left as it was."""
    folders = [tmp_path / "n0", tmp_path / "n1"]
    for f in folders:
        f.mkdir()
        (f / "same.bin").write_bytes(b"s" * 1500)
    (folders[0] / "a.bin").write_bytes(os.urandom(2500))
    (folders[0] / "b.bin").write_bytes(os.urandom(3000))
    (folders[1] / "b.bin").write_bytes(b"old")
    before = os.stat(folders[1] / "same.bin").st_mtime_ns
    script = tmp_path / "ship.py"
    script.write_text(SHIP.format(root=ROOT))
    port, ps = _free_port(), []
    for r in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   WORLD_SIZE="2", LOCAL_RANK="0", GROUP_RANK=str(r), GROUP_WORLD_SIZE="2",
                   OMP_NUM_THREADS="1")
        ps.append(subprocess.Popen([sys.executable, str(script), str(folders[r])], env=env,
                                   text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=120)[0] for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    assert re.search(r"test files: sent a\.bin, b\.bin \(0\.0 MB\)", outs[0]), outs[0]
    assert outs[0].strip().splitlines()[-1].startswith("(5500, "), outs[0]
    for name in ("a.bin", "b.bin", "same.bin"):
        assert _bytes(folders[1] / name) == _bytes(folders[0] / name), name
    assert os.stat(folders[1] / "same.bin").st_mtime_ns == before
