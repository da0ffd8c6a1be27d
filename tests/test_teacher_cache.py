"""teacher.py's cache: content-addressed, checked on every read, rebuilt when damaged, built once
under a lock. A 1-block random teacher (teacher.SYNTHETIC_TEACHER) on tiny synthetic files
(data.write_synthetic): 2 / 1 / 1 images per class per type -> 220 / 110 / 110 rows. CPU only."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import data
import download
import eval as ev
import fileio
import teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {"train_per_class": 2, "val_per_class": 1, "test_per_class": 1}
FILES = {"train_per_class": 20, "test_per_class": 10}  # synthetic CIFAR-10 / CIFAR-10-C sizes
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Synthetic files (seed 0) and a synthetic teacher, copied per test so rewrites stay local."""
    r = tmp_path_factory.mktemp("base")
    data.write_synthetic(str(r / "data"), seed=0, **FILES)
    teacher.write_synthetic_teacher(str(r / "teacher.safetensors"))
    return r


@pytest.fixture
def root(base, tmp_path):
    shutil.copytree(base / "data", tmp_path / "data", copy_function=shutil.copy2)
    return str(tmp_path / "data")


def _run(root, tpath, seed=0, head_epochs=2):
    """What train.py's prepare_teacher does: mix, identity, build, checked logits; plus the log."""
    da = dict(root=root, split="paper", seed=seed, **COUNTS)
    mix = data.build_mix(**da)
    sha = fileio.sha256_file(tpath)
    ident = teacher.identity(
        sha, teacher.SYNTHETIC_TEACHER, mix, da, "bicubic", head_epochs, seed, None
    )
    lines = []
    cache = teacher.build(
        tpath, teacher.SYNTHETIC_TEACHER, mix, da, ident, CPU, None, log=lines.append
    )
    logits = teacher.load_logits(cache, ident, mix["train"])
    log = "\n".join(lines)
    return {"mix": mix, "ident": ident, "cache": cache, "logits": logits, "log": log, "da": da}


def _truncate(path, size):
    with open(path, "rb") as f:
        raw = f.read(size)
    with open(path, "wb") as f:
        f.write(raw)


def _rewrite(root, seed):
    """New file contents, same counts, and the old mtimes put back: only the content tells."""
    stamps = {
        os.path.join(root, sub, f): os.stat(os.path.join(root, sub, f)).st_mtime_ns
        for sub in (download.CIFAR_DIR, download.CIFARC_DIR)
        for f in os.listdir(os.path.join(root, sub))
    }
    assert len(stamps) == 7 + 20  # 5 + 1 batches and batches.meta; 19 corruptions and labels.npy
    data.write_synthetic(root, seed=seed, **FILES)
    for p, t in stamps.items():
        os.utime(p, ns=(t, t))


def test_rewritten_data_files_do_not_reuse_the_cache(root, base):
    tpath = str(base / "teacher.safetensors")
    a = _run(root, tpath)
    assert "head fitted" in a["log"]
    again = _run(root, tpath)  # nothing changed: read back, not rebuilt
    assert again["cache"] == a["cache"] and "cached head and logits" in again["log"]
    assert "features" not in again["log"] and torch.equal(again["logits"], a["logits"])
    _rewrite(root, seed=1)  # the reported bug: same seed and counts, other images
    b = _run(root, tpath)
    fresh = data.build_mix(**a["da"], cache_dir=False)  # the mix as the files now say
    # mix cache not reused
    assert all(torch.equal(b["mix"][s][k], fresh[s][k]) for s in fresh for k in fresh[s])
    assert not torch.equal(b["mix"]["train"]["labels"], a["mix"]["train"]["labels"])
    assert b["cache"] != a["cache"] and "train features" in b["log"] and "head fitted" in b["log"]
    stored = torch.load(os.path.join(b["cache"], "logits_train.pt"), weights_only=True)
    assert torch.equal(stored["labels"], fresh["train"]["labels"])
    assert torch.equal(stored["sources"], fresh["train"]["sources"])
    with pytest.raises(teacher.CacheMismatch, match="another teacher or mix"):
        teacher.load_logits(a["cache"], b["ident"], b["mix"]["train"])  # the old folder is refused


def test_cache_of_another_mix_is_refused_and_rebuilt(root, base, tmp_path, capsys):
    tpath = str(base / "teacher.safetensors")
    a, b = _run(root, tpath, seed=0), _run(root, tpath, seed=1)  # two mixes of the same files
    assert a["cache"] != b["cache"]
    logits_b = os.path.join(b["cache"], "logits_train.pt")
    # (1) another mix's logits file copied into the folder
    shutil.copy(os.path.join(a["cache"], "logits_train.pt"), logits_b)
    with pytest.raises(teacher.CacheMismatch, match="another teacher or mix"):
        teacher.load_logits(b["cache"], b["ident"], b["mix"]["train"])
    # (2) this folder's identity, but rows of the other mix: the labels and sources are compared too
    fileio.atomic_write(
        logits_b,
        {
            "identity": b["ident"],
            "logits": a["logits"],
            "labels": a["mix"]["train"]["labels"],
            "sources": a["mix"]["train"]["sources"],
        },
    )
    with pytest.raises(teacher.CacheMismatch, match="labels disagree"):
        teacher.load_logits(b["cache"], b["ident"], b["mix"]["train"])
    rebuilt = _run(root, tpath, seed=1)  # train.py's path rebuilds what it cannot trust
    assert "head fitted" in rebuilt["log"] and torch.equal(rebuilt["logits"], b["logits"])
    # eval.py --teacher: the head on other data is refused with one line naming the folder
    other = tmp_path / "other"
    shutil.copytree(root, other)
    shutil.rmtree(other / "cache")
    _rewrite(str(other), seed=2)
    head = os.path.join(a["cache"], "teacher_head.pt")
    capsys.readouterr()
    assert ev.main(["--teacher", head, "--data-dir", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and a["cache"] in err and "another mix" in err
    # ... and a features file of another mix beside a matching head is refused too
    shutil.copy(
        os.path.join(b["cache"], "features_test.pt"), os.path.join(a["cache"], "features_test.pt")
    )
    assert ev.main(["--teacher", head, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and a["cache"] in err
    # a head written without an identity cannot be checked: refused
    h = torch.load(head, weights_only=True)
    del h["identity"]
    torch.save(h, tmp_path / "old_head.pt")
    assert ev.main(["--teacher", str(tmp_path / "old_head.pt"), "--device", "cpu"]) == 2
    assert "without a cache identity" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "missing_key", "shape"])
def test_damaged_cache_file_is_rebuilt_never_used(root, base, damage):
    tpath = str(base / "teacher.safetensors")
    a = _run(root, tpath)
    path = os.path.join(a["cache"], "logits_train.pt")
    if damage == "truncate":
        _truncate(path, os.path.getsize(path) // 2)
    elif damage == "missing_key":
        torch.save({"identity": a["ident"], "labels": a["mix"]["train"]["labels"]}, path)
    else:
        torch.save(
            {
                "identity": a["ident"],
                "logits": a["logits"][:, :9].contiguous(),
                "labels": a["mix"]["train"]["labels"],
                "sources": a["mix"]["train"]["sources"],
            },
            path,
        )
    with pytest.raises(teacher.CacheError):
        teacher.load_logits(a["cache"], a["ident"], a["mix"]["train"])
    b = _run(root, tpath)
    assert b["cache"] == a["cache"] and "head fitted" in b["log"] and "features" not in b["log"]
    assert torch.equal(b["logits"], a["logits"])  # the same head fit, deterministic
    if damage == "truncate":  # a truncated features file: recomputed, the other splits kept
        fp = os.path.join(a["cache"], "features_val.pt")
        _truncate(fp, 100)
        c = _run(root, tpath)
        assert "rebuilding val features" in c["log"] and "val features (110, 96)" in c["log"]
        assert "train features" not in c["log"] and torch.equal(c["logits"], a["logits"])


_BUILDER = r"""
import os, sys, time, torch
import data, fileio, teacher
root, tpath, me, other = sys.argv[1:5]
da = dict(root=root, split="paper", seed=5, train_per_class=2, val_per_class=1, test_per_class=1)
mix = data.build_mix(**da)
sha = fileio.sha256_file(tpath)
ident = teacher.identity(sha, teacher.SYNTHETIC_TEACHER, mix, da, "bicubic", 2, 5, None)
open(me, "w").close()                      # a barrier: both call build within milliseconds
t0 = time.time()
while not os.path.exists(other):
    assert time.time() - t0 < 120, "the other builder never started"
    time.sleep(0.002)
cache = teacher.build(tpath, teacher.SYNTHETIC_TEACHER, mix, da, ident, torch.device("cpu"), None,
                      log=lambda m: print(m, flush=True))
print("rows", len(teacher.load_logits(cache, ident, mix["train"])), cache)
"""


def test_two_concurrent_builders_one_builds_the_other_waits(root, base, tmp_path):
    """This process and a subprocess build the same cache at once (a file barrier lines them up)."""
    tpath = str(base / "teacher.safetensors")
    data.build_mix(root, "paper", seed=5, **COUNTS)  # the mix cache first: the teacher's race
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    mine, theirs = str(tmp_path / "ready-test"), str(tmp_path / "ready-sub")
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILDER, root, tpath, theirs, mine],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        da = dict(root=root, split="paper", seed=5, **COUNTS)
        mix = data.build_mix(**da)
        ident = teacher.identity(
            fileio.sha256_file(tpath), teacher.SYNTHETIC_TEACHER, mix, da, "bicubic", 2, 5, None
        )
        while not os.path.exists(theirs):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.002)
        open(mine, "w").close()
        lines = []
        cache = teacher.build(
            tpath, teacher.SYNTHETIC_TEACHER, mix, da, ident, CPU, None, log=lines.append
        )
        n = len(teacher.load_logits(cache, ident, mix["train"]))
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    outs = ["\n".join(lines), out]
    built = [o for o in outs if "head fitted" in o]
    waited = [o for o in outs if "waiting for another process" in o]
    assert len(built) == 1 and len(waited) == 1 and built != waited, outs
    assert "cached head and logits" in waited[0] and "features" not in waited[0]
    assert n == 220 and out.strip().splitlines()[-1] == f"rows 220 {cache}"
    assert sorted(os.listdir(cache)) == [  # no temporary files left
        ".lock", "features_test.pt", "features_train.pt", "features_val.pt", "logits_train.pt",
        "teacher_head.pt",
    ]


def test_complete_cache_is_read_without_the_lock(root, base, monkeypatch):
    """A complete cache on a read-only data folder (a shared dataset mount) is read, not locked:
    taking the lock would create <cache>/.lock. Root ignores file modes, so the lock is made to
    fail."""
    tpath = str(base / "teacher.safetensors")
    a = _run(root, tpath)

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(teacher, "locked", refuse)
    b = _run(root, tpath)
    assert b["cache"] == a["cache"] and "cached head and logits" in b["log"]
    assert torch.equal(b["logits"], a["logits"])


def test_head_fit_without_an_epoch_is_one_line():
    feats = {
        s: {"features": torch.randn(4, 8), "labels": torch.arange(4)} for s in ("train", "test")
    }
    # no val rows
    feats["val"] = {"features": torch.randn(0, 8), "labels": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(teacher.CacheError, match="no epoch to select"):
        teacher.fit_head(feats, CPU, 2, 0)
    feats["val"] = feats["train"]
    with pytest.raises(teacher.CacheError, match="--head-epochs >= 1"):
        teacher.fit_head(feats, CPU, 0, 0)


def test_head_fit_settings_key_the_cache(root, base, monkeypatch):
    """The head fit's label smoothing (the thesis's code: 0.1) reaches both the fit and the cache
    key: another value fits another head and names another cache folder."""
    feats = {
        s: {
            "features": torch.randn(40, 8, generator=torch.Generator().manual_seed(i)),
            "labels": torch.arange(40) % 10,
        }
        for i, s in enumerate(("train", "val", "test"))
    }
    a = _run(root, str(base / "teacher.safetensors"))
    head = teacher.fit_head(feats, CPU, 3, 0)[0].weight.detach().clone()
    # seeded: the same head again
    assert torch.equal(teacher.fit_head(feats, CPU, 3, 0)[0].weight, head)
    assert a["ident"]["head"]["smoothing"] == 0.1
    monkeypatch.setattr(teacher, "HEAD_SMOOTHING", 0.0)
    ident = teacher.identity(
        a["ident"]["teacher_sha256"],
        teacher.SYNTHETIC_TEACHER,
        a["mix"],
        a["da"],
        "bicubic",
        2,
        0,
        None,
    )
    assert teacher.cache_dir(root, ident) != a["cache"]
    assert not torch.allclose(teacher.fit_head(feats, CPU, 3, 0)[0].weight, head)
