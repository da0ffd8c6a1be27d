"""A user's mistakes on the command lines of train.py, eval.py and reproduce.py: each class of bad
value or combination is refused right after parsing with one line that names the flag, exit status
2, no traceback and nothing written, within seconds. Most cases run in-process (the entry points'
main, as the command line calls it); a few through real subprocesses prove the whole path. Also:
train.py's grouped --help with defaults, eval.py's run labels, the offline download instructions.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import eval as ev
import reproduce
import train
from model import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SYN = ["--dataset", "synthetic", "--device", "cpu"]


def _refused(main, argv, capsys, flag, tmp_path, code=2):
    """main(argv) in an empty folder: exit `code`, one line naming `flag`, nothing on stdout, no
    file."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's type errors exit from parse_args
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == code, (argv, rc, err)
    one_line = len(err.strip().splitlines()) == 1
    assert one_line and flag in err and "Traceback" not in err, (argv, err)
    assert out == "", (argv, out)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [], (argv, left)
    return err


@pytest.fixture
def empty(tmp_path, monkeypatch):
    """An empty working folder (train.py's ./data and out/ would land here) and no torchrun env.
    train.py's work stage fails the test at once if a bad value ever gets past the checks."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(
        train, "run", lambda args, *rest: pytest.fail(f"train.py went to work on {vars(args)}")
    )
    return d


# ----------------------------------------------------------------------------- train.py

TRAIN_VALUES = [  # (flags, the flag the line must name): one bad value per kind of range
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--seed", "-1"], "--seed"),
    (["--mixup-prob", "2"], "--mixup-prob"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--log-interval", "0"], "--log-interval"),
    (["--head-epochs", "0"], "--head-epochs"),
    (["--smoothing", "1"], "--smoothing"),
    (["--drop-path", "-0.1"], "--drop-path"),
    (["--randaug", "31"], "--randaug"),
    (["--alpha", "1.5"], "--alpha"),
    (["--tau", "0"], "--tau"),
    (["--crop-padding", "-1"], "--crop-padding"),
    (["--epochs", "two"], "--epochs"),
    (["--model", "resnet"], "--model"),
    (["--mirror", "ftp://host"], "--mirror"),
    (["--num-heads", "0"], "--num-heads"),
]
TRAIN_COMBOS = [
    (["--embed-dim", "50", "--num-heads", "3"], "--embed-dim"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--amp", "fp16", "--device", "cpu"], "--amp"),
    (["--warmup-epochs", "20", "--epochs", "15"], "--warmup-epochs"),
    (["--model", "vit", "--distill", "hard"], "--distill"),
    (["--model", "deit", "--distill", "none"], "--distill"),
    (["--batch-size", "5000"], "--batch-size"),
]


def test_train_bad_values_and_combinations(empty, capsys):
    for flags, flag in TRAIN_VALUES + TRAIN_COMBOS:
        err = _refused(
            train.main,
            SYN + flags if "--device" not in flags else ["--dataset", "synthetic"] + flags,
            capsys,
            flag,
            empty,
        )
        assert err.startswith("train.py: error: "), err
    assert "2.0 is not" not in _refused(
        train.main, ["--mixup-prob", "2"], capsys, "2 is not a probability", empty
    )


def test_train_paths_resume_and_ranks(empty, capsys, monkeypatch):
    blocker = empty.parent / "a-file"
    blocker.write_text("x")
    for flags, flag in [
        (["--data-dir", blocker], "--data-dir"),
        (["--out-dir", blocker], "--out-dir"),
        (["--teacher", empty.parent / "none.st"], "--teacher"),
        (["--out-dir", blocker / "run"], "--out-dir"),
        (["--resume", "--out-dir", empty.parent / "o"], "--resume"),
    ]:
        _refused(train.main, SYN + flags, capsys, flag, empty)
    # a finished 1-epoch run: --resume --epochs 2 would stretch its cosine schedule; refused, naming
    # it
    out = empty.parent / "run"
    out.mkdir()
    cfg = vars(train.get_args(SYN + ["--out-dir", str(out), "--epochs", "1"]))
    torch.save({"kind": "cdeit-kit/student", "config": cfg, "epoch": 1}, out / "ckpt.pt")
    before = sorted(os.listdir(out))
    err = _refused(
        train.main, SYN + ["--out-dir", out, "--resume", "--epochs", "2"], capsys, "--resume", empty
    )
    assert "--epochs 1 -> 2" in err and sorted(os.listdir(out)) == before
    # no --resume: not overwritten
    err = _refused(train.main, SYN + ["--out-dir", out], capsys, "--out-dir", empty)
    assert "pass --resume" in err
    # torchrun: the global batch must split evenly; only rank 0 prints, every rank exits 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    _refused(train.main, SYN + ["--batch-size", "64"], capsys, "--batch-size", empty)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        train.main(SYN + ["--lr", "-1"])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    assert train.main(SYN + ["--batch-size", "64"]) == 2 and capsys.readouterr().err == ""


def test_train_help_is_grouped_with_defaults():
    p = train.parser()
    titles = [g.title.split(" (")[0] for g in p._action_groups]
    assert {"model", "data", "recipe", "distillation", "run"} <= set(titles), titles
    text = p.format_help()
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help line"
    for flag, default in [
        ("--lr", "0.0005"),
        ("--weight-decay", "0.05"),
        ("--smoothing", "0.1"),
        ("--drop-path", "0.1"),
        ("--tau", "3.0"),
        ("--alpha", "0.5"),
        ("--seed", "0"),
        ("--data-dir", "./data"),
    ]:
        block = text.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(block.split()), (flag, block)


def test_offline_download_is_readable_and_leaves_nothing(empty):
    """The real download path with an unreachable mirror: the multi-line instructions (one block per
    file: URL, checksum, where to put it), no traceback, and neither the data folder nor the out
    dir."""
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--mirror",
            "file:///nonexistent-mirror", "--device", "cpu"]
    r = subprocess.run(
        argv, cwd=empty, capture_output=True, text=True, timeout=60, env=ENV, check=False
    )
    lines = r.stderr.strip().splitlines()
    assert (
        r.returncode == 1
        and lines[0].startswith("error: could not fetch 3 files into ")
        and "--mirror" in lines[0]
    )
    assert (
        sum("put it at" in ln for ln in lines) == 3 and sum("checksum:" in ln for ln in lines) == 3
    )
    assert "Traceback" not in r.stderr and os.listdir(empty) == [], os.listdir(empty)


# ----------------------------------------------------------------------------- eval.py


def test_eval_bad_options_and_inputs(empty, capsys):
    d = empty.parent
    ck = d / "moved.pt"  # a real student checkpoint whose data folder is gone
    net = create_model("vit", depth=1, embed_dim=32, num_heads=2)
    torch.save(
        {
            "kind": "cdeit-kit/student",
            "version": 1,
            "model_name": "vit",
            "model_args": {"depth": 1, "embed_dim": 32, "num_heads": 2, "layout": "thesis"},
            "model": net.state_dict(),
            "config": {"model": "vit", "distill": "none"},
            "data_args": {"root": str(d / "gone"), "split": "paper"},
        },
        ck,
    )
    (d / "run").mkdir()
    (d / "run" / "best.pt").write_bytes(ck.read_bytes())
    (d / "res.json").write_text(json.dumps({"kind": "cdeit-kit/eval"}))
    cases = [
        ([ck, "--batch-size", "0"], "--batch-size"),
        ([ck, "--device", "tpu"], "--device"),
        ([ck, "--json", d / "no" / "x.json"], "--json"),
        ([ck, "--plot", d], "--plot"),
        ([ck, "--data-dir", d / "nope"], "--data-dir"),
        ([ck, "--extra"], "--extra"),
        ([], "checkpoint"),
        ([ck, "--split", "train"], "--split"),
        ([d / "run"], "best.pt"),
        ([d / "res.json"], "--baseline"),
        ([ck], "--data-dir"),
    ]
    for argv, flag in cases:
        err = _refused(ev.main, argv, capsys, flag, empty)
        assert err.startswith("eval.py: error: "), err
    assert "gone" in _refused(ev.main, [ck], capsys, "does not exist", empty)


def test_eval_labels_tell_runs_apart():
    def r(path, **cfg):
        return {
            "checkpoint": path,
            "model_name": "deit",
            "distill": "hard",
            "train_config": {
                "model": "deit",
                "distill": "hard",
                "out_dir": os.path.dirname(path),
                **cfg,
            },
        }

    seeds = ev.run_labels(
        [r("out/a/best.pt", seed=0, lr=5e-4), r("out/b/best.pt", seed=1, lr=5e-4)]
    )
    assert seeds == ["deit/hard --seed 0", "deit/hard --seed 1"]
    # copies: their folders
    same = ev.run_labels([r("out/a/best.pt", seed=0), r("out/b/best.pt", seed=0)])
    assert same == ["deit/hard a", "deit/hard b"]
    one = ev.run_labels(
        [r("out/a/best.pt"), r("out/a/ckpt.pt"), {**r("out/v/best.pt"), "model_name": "vit"}]
    )
    assert one == ["deit/hard a (out/a/best.pt)", "deit/hard a (out/a/ckpt.pt)", "vit/hard"]
    assert (
        len(
            set(ev.run_labels([r(f"o/{i}/best.pt", seed=i, lr=i, drop=i, tau=i) for i in range(2)]))
        )
        == 2
    )


# ----------------------------------------------------------------------------- reproduce.py


def test_reproduce_bad_options_and_passthrough(empty, capsys):
    blocker = empty.parent / "a-file"
    blocker.write_text("x")
    syn = ["--dataset", "synthetic", "--device", "cpu"]
    cases = [
        (["table3", "--seeds", "0", "0"], "--seeds"),
        (["table3", "--seeds", "-1"], "--seeds"),
        (["table3", "--gpus", "a"], "--gpus"),
        (["table3", "--nproc-per-node", "0"], "--nproc-per-node"),
        (["table3", "--device", "tpu"], "--device"),
        (["table3", "--out", blocker], "--out"),
        (["table3", "--data-dir", blocker], "--data-dir"),
        (["tableX"], "experiment"),
        (["table3"] + syn + ["--", "--seed", "3"], "--seeds"),
        (["table2"] + syn + ["--", "--lr", "1"], "--lr"),
        (["table3"] + syn + ["--", "--out-dir", "x"], "--out"),
        (["table3"] + syn + ["--", "--epochs", "0"], "--epochs"),
        (["table3"] + syn + ["--", "--embed-dim", "50", "--num-heads", "3"], "--embed-dim"),
        (["table3"] + syn + ["--nproc-per-node", "3", "--", "--batch-size", "64"], "--batch-size"),
    ]
    if not torch.cuda.is_available():
        cases.append((["table3", "--gpus", "0,1"], "--gpus"))
    for argv, flag in cases:
        err = _refused(reproduce.main, argv, capsys, flag, empty)
        assert err.startswith("reproduce.py: error: "), err


def test_reproduce_help_explains_experiments_seeds_and_passthrough():
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "reproduce.py"), "--help"],
        capture_output=True, text=True, timeout=30, env=ENV, check=True,
    )
    text = " ".join(r.stdout.split())
    for name, e in reproduce.EXPERIMENTS.items():
        assert f"{name} {e['title']}" in text, name
    assert "(default: [0, 1, 2])" in text and "after --: flags for every train.py run" in text


# ------------------------------------------------------------------------- the real command lines


def test_command_lines_one_line_no_traceback_fast(empty):
    """Through the real interpreter (imports included): one line on stderr, none on stdout, exit 2,
    in seconds, nothing written in the working folder."""
    cases = [
        (["train.py", "--mixup-prob", "2"], "--mixup-prob"),
        (["train.py", "--embed-dim", "50", "--num-heads", "3", "--device", "cpu"], "--embed-dim"),
        (["eval.py", str(empty), "--device", "cpu"], "a folder"),
        (["reproduce.py", "table3", "--dataset", "synthetic", "--device", "cpu", "--", "--lr",
          "nan"], "--lr"),
    ]
    for argv, flag in cases:
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]],
            cwd=empty, capture_output=True, text=True, timeout=60, env=ENV, check=False,
        )
        took = time.time() - t0
        ok = r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
        assert ok, (argv, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and flag in r.stderr, (argv, r.stderr)
        assert os.listdir(empty) == [] and took < 20, (argv, took)
