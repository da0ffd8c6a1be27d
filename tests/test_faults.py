"""Faults a long run meets: a full or failing disk, out of GPU memory, a SIGKILL at any moment, a
torchrun rank that dies. Each gives one line, keeps the last checkpoint, and --resume continues
exactly (bit-identical weights to a run that never stopped).

Everything runs on CPU with a tiny student (1 block, D=32) on synthetic data. The disk-full test
uses a real small tmpfs when this process may mount one (root), else it is skipped and the
injected-error tests stand in; out of memory is a patched step raising torch.OutOfMemoryError.
"""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as evaluate_cli
import fileio
import scoring
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--train-per-class", "4",
        "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "44", "--head-epochs", "2",
        "--dataset", "synthetic", "--device", "cpu", "--model", "cdeit",
        "--distill", "hard"]  # 440 images -> 10 steps per epoch
EPOCHS = 3
STEPS = 10 * EPOCHS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # synthetic files + teacher cache, shared by the tests
    return str(tmp_path_factory.mktemp("data"))


def _argv(data_dir, out, epochs=EPOCHS, log_interval=1):
    return TINY + ["--epochs", str(epochs), "--data-dir", data_dir, "--out-dir", str(out),
                   "--log-interval", str(log_interval)]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _rows(path):
    return [line.rsplit(",", 1)[0] for line in open(path).read().splitlines()]  # drop epoch_time_s


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run every faulty run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "o"
    assert train.main(_argv(data_dir, out)) == 0
    return out


def _same_run(a, b):
    """b's files equal a's: weights, optimizer state and counters of ckpt.pt and best.pt, and
    summary.csv."""
    for name in ("ckpt.pt", "best.pt"):
        ca, cb = _load(a / name), _load(b / name)
        assert (ca["epoch"], ca["step"], ca["best_val_accuracy"]) == (cb["epoch"], cb["step"],
                                                                      cb["best_val_accuracy"])
        assert ca["model"].keys() == cb["model"].keys()
        for k in ca["model"]:
            assert torch.equal(ca["model"][k], cb["model"][k]), (name, k)
        for k, v in ca["optimizer"]["state"].items():
            assert all(torch.equal(v[s], cb["optimizer"]["state"][k][s]) for s in v), (name, k)
    assert _rows(a / "summary.csv") == _rows(b / "summary.csv")
    assert fileio.temp_files(str(b)) == []


# ----------------------------------------------------------------------------- the atomic writer

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS])
def test_atomic_write_error_is_one_line_and_keeps_old_file(tmp_path, monkeypatch, code):
    path = tmp_path / "ckpt.pt"
    fileio.atomic_write(path, {"w": torch.ones(3)}, "checkpoint")

    def fail(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", fail)  # the temp file is written, then the disk refuses
    with pytest.raises(fileio.WriteError) as e:
        fileio.atomic_write(path, {"w": torch.zeros(3)}, "checkpoint")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"could not write checkpoint {path}: "
                                              f"{os.strerror(code)}"), msg
    assert msg.endswith("the previous file is unchanged")
    if code == errno.ENOSPC:
        assert re.search(r"\([\d.]+ [KMG]?B free, [\d.]+ KB needed\)", msg), msg
    monkeypatch.undo()
    assert torch.equal(_load(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_atomic_write_serialising_error_touches_nothing(tmp_path):
    path = tmp_path / "a.bin"
    fileio.atomic_write(path, b"old", "file")

    def crash(f):
        f.write(b"half a file")
        raise RuntimeError("render failed")
    with pytest.raises(RuntimeError, match="render failed"):
        fileio.atomic_write(path, crash, "file")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


# ----------------------------------------------------------------------------- disk full

def _fail_nth_write(monkeypatch, name, n, code=errno.ENOSPC):
    """The n-th atomic write of `name` fails in fsync with OSError(code), as a full disk does."""
    real, seen = os.fsync, [0]

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            seen[0] += 1
            if seen[0] == n:
                raise OSError(code, os.strerror(code))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_at_checkpoint_one_line_then_resume_exact(tmp_path, data_dir, reference,
                                                            monkeypatch, capsys):
    out = tmp_path / "o"
    _fail_nth_write(monkeypatch, "ckpt.pt", 2)  # the end of epoch 2
    capsys.readouterr()
    assert train.main(_argv(data_dir, out)) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: could not write checkpoint {re.escape(str(out / 'ckpt.pt'))}: "
                        r"No space left on device \([\d.]+ [KMG]?B free, [\d.]+ KB needed\); "
                        r"the previous file is unchanged; then continue with --resume\n", err), err
    assert _load(out / "ckpt.pt")["epoch"] == 1 and fileio.temp_files(str(out)) == []
    monkeypatch.undo()  # space freed
    assert train.main(_argv(data_dir, out) + ["--resume"]) == 0
    _same_run(reference, out)


def _mount_tmpfs(path, size):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, check=False)
    return r.returncode == 0


def test_real_full_disk_then_resume_exact(tmp_path, data_dir, reference, capsys):
    """A real filesystem that fills up mid-run (a tmpfs, so root only): one line, old checkpoint
    intact,
    no temp file; after space is freed --resume reproduces the uninterrupted run."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the "
                    "message")
    try:
        ck = os.path.getsize(reference / "ckpt.pt")
        page = os.statvfs(disk).f_frsize
        pages = lambda n: -(-n // page) * page
        # room for config, summary, ckpt and best of epoch 1 plus half a checkpoint: epoch 2's
        # save fails
        room = pages(4096) * 2 + 2 * pages(ck) + ck // 2
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - room))
        out = disk / "o"
        capsys.readouterr()
        assert train.main(_argv(data_dir, out)) == 1
        err = capsys.readouterr().err
        assert re.fullmatch(r"error: could not write (best )?checkpoint \S+\.pt: No space left on "
                            r"device \([\d.]+ [KMG]?B free, [\d.]+ KB needed\); the previous file "
                            r"is unchanged; then continue with --resume\n", err), err
        assert _load(out / "ckpt.pt")["epoch"] == 1 and fileio.temp_files(str(out)) == []
        assert train.main(_argv(data_dir, out) + ["--resume"]) == 1  # still full: the same one line
        assert re.fullmatch(r"error: could not write (best )?checkpoint .*--resume\n",
                            capsys.readouterr().err)
        assert _load(out / "ckpt.pt")["epoch"] == 1 and fileio.temp_files(str(out)) == []
        (disk / "filler").unlink()  # space freed
        assert train.main(_argv(data_dir, out) + ["--resume"]) == 0
        _same_run(reference, out)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ----------------------------------------------------------------------------- out of memory

def _oom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("where", ["train_step", "run_student"])
def test_out_of_memory_one_line_keeps_checkpoint(tmp_path, data_dir, monkeypatch, capsys, where):
    out = tmp_path / "o"
    # epoch 1 done and saved
    assert train.main(_argv(data_dir, out, epochs=2), stop_at_step=10) == 0
    before = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(train, where, _oom)
    capsys.readouterr()
    assert train.main(_argv(data_dir, out, epochs=2) + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: out of GPU memory on cpu at 44 images per GPU \(--batch-size\): "
                        r"use a smaller --batch-size \(e\.g\. 22\) in a new --out-dir \(--resume "
                        r"needs the same flags\); "
                        rf"the last checkpoint {re.escape(str(out / 'ckpt.pt'))} is kept\n",
                        err), err
    assert (out / "ckpt.pt").read_bytes() == before and fileio.temp_files(str(out)) == []


def test_eval_out_of_memory_one_line(reference, monkeypatch, capsys):
    monkeypatch.setattr(scoring, "run_student", _oom)
    assert evaluate_cli.main([str(reference / "best.pt"), "--device", "cpu", "--batch-size",
                              "64"]) == 2
    err = capsys.readouterr().err
    assert err == ("eval.py: error: out of GPU memory at --batch-size 64 (images per step): use a "
                   "smaller --batch-size, e.g. --batch-size 32\n"), err


def test_eval_write_error_one_line_keeps_old_json(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    out.write_text('{"old": 1}')
    _fail_nth_write(monkeypatch, "r.json", 1)
    assert evaluate_cli.main([str(reference / "best.pt"), "--device", "cpu", "--json",
                              str(out)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"eval.py: error: could not write results JSON {re.escape(str(out))}: "
                        r"No space left on device \(.* free, .* needed\); the previous file is "
                        r"unchanged\n",
                        err), err
    assert json.loads(out.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["r.json"]


# ----------------------------------------------------------------------------- SIGKILL

def _killed_child(argv, how, at, phase):
    """Fork (torch is already imported here, so a trial costs about a second), run train.main in the
    child and SIGKILL it: after its `at`-th training step, or inside its `at`-th atomic write in
    `phase`: "write" with half the temp file on disk, "sync" with it complete but not renamed,
    "rename" right after the rename. Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2)
            die = lambda: os.kill(os.getpid(), signal.SIGKILL)
            seen, real_fsync, real_replace, real_step = [0], os.fsync, os.replace, train.train_step

            def fsync(fd):
                seen[0] += 1
                if seen[0] == at and phase == "write":
                    os.ftruncate(fd, os.fstat(fd).st_size // 2)
                    die()
                real_fsync(fd)
                if seen[0] == at and phase == "sync":
                    die()

            def replace(a, b):
                real_replace(a, b)
                if seen[0] == at and phase == "rename":
                    die()

            def step(*a, **k):
                out = real_step(*a, **k)
                seen[0] += 1
                if seen[0] == at:
                    die()
                return out
            if how == "save":
                os.fsync, os.replace = fsync, replace
            else:
                train.train_step = step
            train.main(argv)
        finally:
            os._exit(3)  # not killed: the trial's kill point was never reached
    return os.waitpid(pid, 0)[1]


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, data_dir, reference):
    """SIGKILL (no chance to clean up) after random training steps, inside every atomic write of a
    run (each in one of three phases, the first drawn at random), and once from outside at a random
    step; each time rerun the same command (with --resume once ckpt.pt exists) and check every file
    against the uninterrupted run."""
    vals = [row["val_accuracy"] for row in _load(reference / "ckpt.pt")["history"]]
    improved = sum(v > max(vals[:i], default=-1) for i, v in enumerate(vals))
    # config.json, then per epoch best.pt if improved, summary.csv, ckpt.pt
    writes = 1 + 2 * EPOCHS + improved
    rng = random.Random(int(os.environ.get("CDEIT_FAULT_SEED", "0")))
    phases, first = ["write", "sync", "rename"], rng.randrange(3)
    trials = [("step", k, None) for k in sorted(rng.sample(range(1, STEPS), 3))]
    trials += [("save", n, phases[(first + n) % 3]) for n in range(1, writes + 1)]
    trials += [("outside", rng.randint(1, STEPS - 1), rng.uniform(0, 0.05))]
    exact = 0
    for i, (how, at, extra) in enumerate(trials):
        out = tmp_path / f"t{i}"
        argv = _argv(data_dir, out)
        if how == "outside":  # a separate process, killed from here while it trains
            p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=_env())
            for line in p.stdout:
                if line.startswith(f"step {at}/"):
                    time.sleep(extra)
                    p.kill()
                    break
            p.stdout.close()
            assert p.wait(timeout=120) == -signal.SIGKILL, (how, at)
        else:
            status = _killed_child(argv, how, at, extra)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert killed, (how, at, extra, status)
        resume = ["--resume"] if (out / "ckpt.pt").exists() else []
        assert train.main(argv + resume) == 0, (how, at, extra)
        _same_run(reference, out)
        exact += 1
    print(f"\n{len(trials)} runs SIGKILLed ({trials}), {exact} resumed bit-identical")
    assert exact == len(trials) >= 10


# ----------------------------------------------------------------------------- torchrun

VIT = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--train-per-class", "4",
       "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "44", "--dataset",
       "synthetic", "--device", "cpu", "--model", "vit", "--distill", "none", "--epochs", "1000",
       "--log-interval", "1"]


def _children(pid):
    kids = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                rank = [e[5:] for e in env if e.startswith(b"RANK=")]
                if rank:
                    kids[int(rank[0])] = int(d)
        except OSError:
            pass
    return kids


def test_torchrun_rank_killed_others_stop_in_seconds(tmp_path, data_dir):
    """torchrun, 2 gloo ranks, rank 1 SIGKILLed mid-training: everything stops within seconds and
    torchrun names rank 1 as the first failure (its agent stops the surviving rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *VIT,
           "--data-dir", data_dir, "--out-dir", str(tmp_path / "o")]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env(),
                         start_new_session=True)
    try:
        lines, t_kill = [], None
        for line in p.stdout:
            lines.append(line)
            if line.startswith("step 12/"):  # an epoch saved, the second under way
                os.kill(_children(p.pid)[1], signal.SIGKILL)
                t_kill = time.time()
                break
        rest = p.communicate(timeout=120)[0]
        stopped = time.time() - t_kill
    finally:
        _kill_group(p)
    text = "".join(lines) + rest
    print(f"\ntorchrun: rank 1 killed, rank 0 and torchrun stopped {stopped:.1f} s later")
    assert p.returncode != 0 and stopped < 30, text[-3000:]
    root = text[text.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", root), root
    assert _load(tmp_path / "o" / "ckpt.pt")["epoch"] >= 1  # the epoch's checkpoint is intact


def _kill_group(p):
    try:
        # only if the test failed half way: no stray run keeps going
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
