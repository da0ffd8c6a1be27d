"""train.py: the offline smoke run, exact resume, flag errors, DDP == one process,
and --split standard (fresh corruptions per batch, live teacher, exact resume).

Everything runs on CPU. Apart from the smoke run (the real README command, full DeiT-Tiny size,
run once per session by conftest's `smoke_run` fixture and shared with tests/test_eval.py),
students are tiny (2 blocks, D=48) on a few hundred synthetic images, so the file stays within
its share of the suite's time budget (~3 minutes on 2 cores, most of it the smoke run).
"""
import os
import re
import subprocess
import sys

import pytest
import torch

import augment
import data
import train
from model import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--embed-dim", "48", "--num-heads", "2", "--train-per-class", "4",
        "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "44", "--head-epochs", "2",
        "--dataset", "synthetic", "--device", "cpu"]  # 440 train images -> 10 steps per epoch
CKPT_KEYS = {"kind", "version", "model_name", "model_args", "model", "optimizer", "epoch", "step",
             "rng",
             "config", "data_args", "dataset", "best_val_accuracy", "teacher"}


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # synthetic files + teacher cache, shared by the tests
    return str(tmp_path_factory.mktemp("data"))


def test_smoke_run_end_to_end(smoke_run):
    """The README's offline command, as a user types it (conftest's session fixture runs it
    once)."""
    out = smoke_run
    stdout = (out.parent / "stdout.txt").read_text()
    assert "SYNTHETIC" in stdout and "RANDOM" in stdout  # says plainly that nothing here is real
    assert re.search(r"teacher: head fitted .* val [\d.]+%, test [\d.]+%", stdout)
    assert re.search(r"step \d+/\d+ \| epoch 1 \| loss [\d.]+ \(cls [\d.]+ cls\+corr [\d.]+ dist "
                     r"[\d.]+ type [\d.]+\)", stdout)
    for f in ("config.json", "summary.csv", "ckpt.pt", "best.pt"):
        assert (out / f).is_file(), f
    # header, untrained, epoch 1
    assert len((out / "summary.csv").read_text().strip().splitlines()) == 1 + 2
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert CKPT_KEYS <= set(ck) and ck["kind"] == "cdeit-kit/student" and ck["epoch"] == 1
    assert ck["step"] == 34 and ck["config"]["batch_size"] == 64  # 2,200 images, batch 64
    assert ck["data_args"]["train_per_class"] == 20 and ck["dataset"] == "synthetic"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    head = torch.load(ck["teacher"]["head"], map_location="cpu", weights_only=True)
    assert head["kind"] == "cdeit-kit/teacher-head" and head["weight"].shape == (10, 96)
    # the checkpoint rebuilds the model by itself, as eval.py does
    m = create_model(ck["model_name"], **ck["model_args"])
    m.load_state_dict(ck["model"])
    assert len(ck["model"]) > 100  # 12 blocks


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# at the epoch boundary / mid-epoch (a SIGTERM-style save)
@pytest.mark.parametrize("stop_at", [10, 13])
def test_resume_is_bit_identical(tmp_path, data_dir, stop_at, capsys):
    base = TINY + ["--model", "cdeit", "--distill", "hard", "--epochs", "2", "--data-dir", data_dir,
                   # defaults keep mixup, erasing, drop-path: every RNG matters
                   "--log-interval", "1"]
    assert train.main(base + ["--out-dir", str(tmp_path / "a")]) == 0
    assert train.main(base + ["--out-dir", str(tmp_path / "b")], stop_at_step=stop_at) == 0
    ck = torch.load(tmp_path / "b" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == stop_at and ck["epoch"] == stop_at // 10
    assert "scaler" in ck  # --amp fp16's loss scale resumes too (empty when fp16 is off)
    # --no-fused only picks the attention kernel (the same weights): a resume accepts it
    assert train.main(base + ["--out-dir", str(tmp_path / "b"), "--resume"]
                      + (["--no-fused"] if stop_at == 13 else [])) == 0
    a, b = _weights(tmp_path / "a" / "ckpt.pt"), _weights(tmp_path / "b" / "ckpt.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = (tmp_path / "a" / "summary.csv").read_text().splitlines()
    sb = (tmp_path / "b" / "summary.csv").read_text().splitlines()
    assert [x.rsplit(",", 1)[0] for x in sa] == [x.rsplit(",", 1)[0] for x in sb]  # no timings
    capsys.readouterr()
    assert train.main(base + ["--out-dir", str(tmp_path / "a"), "--resume"]) == 0  # finished
    assert "already trained 2 epochs; nothing to do" in capsys.readouterr().out
    other = [f if f != "2" or base[i - 1] != "--depth" else "3" for i, f in enumerate(base)]
    assert train.main(other + ["--out-dir", str(tmp_path / "b"), "--resume"]) == 2
    assert "--depth 2 -> 3" in capsys.readouterr().err  # the refusal names what differs
    # a checkpoint written before model_args had `layout` was built in timm's layout: a resume with
    # today's default (thesis) is refused, not rebuilt differently
    ck = torch.load(tmp_path / "b" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["model_args"].pop("layout") == "thesis"
    torch.save(ck, tmp_path / "b" / "ckpt.pt")
    assert train.main(base + ["--out-dir", str(tmp_path / "b"), "--resume"]) == 1
    assert "layout timm -> thesis" in capsys.readouterr().err


def test_bad_flags_give_one_line_and_nonzero_exit(tmp_path, data_dir, capsys):
    r = subprocess.run([sys.executable, "train.py", "--model", "vit", "--distill", "hard"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(),
                       check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--distill none" in r.stderr, r.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [(["--model", "deit", "--distill", "none"], "--distill hard or soft"),
             (["--model", "deit", "--distill", "soft", "--teacher",
               str(tmp_path / "none.safetensors")],
              "none.safetensors: no such file"),
             (["--model", "vit", "--distill", "none", "--out-dir", str(blocker / "run")],
              "cannot be created"),
             (["--model", "vit", "--distill", "none", "--out-dir", str(tmp_path / "x"), "--resume"],
              "no checkpoint")]
    for flags, msg in cases:
        capsys.readouterr()
        argv = TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "o")] + flags
        assert train.main(argv) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("train.py: error: ") and msg in err, err
        assert err.strip().count("\n") == 0, err


def _losses(stdout):
    pattern = r"^step \d+/\d+ \| epoch \d+ \| loss ([\d.]+)"
    return [float(v) for v in re.findall(pattern, stdout, re.MULTILINE)]


def test_ddp_two_processes_match_one(tmp_path, data_dir):
    """torchrun --nproc_per_node=2 (gloo) vs one process, same global batch of 44.

    DeviceLoader hands each rank one half of the same global batch, and DDP averages the two
    halves' gradients, so the step is the same one up to fp32 summation order. What would differ
    by construction is randomness drawn per rank (augmentation generators and drop-path masks are
    seeded from (seed, epoch, rank)), so this test turns those off: no crop/flip/erasing/mixup, no
    drop-path. The teacher logits come from the shared cache."""
    flags = TINY + ["--model", "cdeit", "--distill", "soft", "--epochs", "1", "--data-dir",
                    data_dir,
                    "--log-interval", "1", "--crop-padding", "0", "--no-hflip", "--erase-prob", "0",
                    "--mixup-prob", "0", "--drop-path", "0", "--lr", "1e-2", "--warmup-epochs", "0"]
    one = subprocess.run([sys.executable, "train.py", *flags, "--out-dir", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(),
                         check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "train.py", *flags, "--out-dir",
                          str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=_env(), check=False)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "on 2 x cpu" in two.stdout
    l1, l2 = _losses(one.stdout), _losses(two.stdout)
    assert len(l1) == len(l2) == 10
    assert l1 == pytest.approx(l2, abs=2e-4)  # printed with 4 decimals
    w1, w2 = _weights(tmp_path / "one" / "ckpt.pt"), _weights(tmp_path / "two" / "ckpt.pt")
    torch.manual_seed(0)
    w0 = create_model("cdeit", depth=2, embed_dim=48, num_heads=2, drop_path=0.0).state_dict()
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    assert moved > 1e-3  # ten real steps happened, so agreement below is not agreement at init
    for k in w1:
        a, b = w1[k], w2[k]
        # the key bias: softmax ignores it, so its gradient is 0 up to
        if k.endswith("attn.qkv.bias"):
            # rounding, which AdamW scales up into steps whose sign depends on
            D = len(a) // 3
            # summation order
            torch.testing.assert_close(b[D:2 * D], a[D:2 * D], rtol=0, atol=1e-3, msg=k)
            a, b = torch.cat([a[:D], a[2 * D:]]), torch.cat([b[:D], b[2 * D:]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    argv = TINY + ["--data-dir", data_dir, "--out-dir", str(tmp_path / "o"), "--epochs", "2"]
    assert train.main(argv, stop_at_step=10) == 0  # epoch 1 done and saved
    before = _weights(tmp_path / "o" / "ckpt.pt")
    capsys.readouterr()
    # the second epoch at an absurd lr (the same flags, so the resume is allowed): the loss
    # overflows
    monkeypatch.setattr(train, "lr_at", lambda *a: 1e9)
    assert train.main(argv + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: non-finite loss at step (\d+); stopped, the last good checkpoint "
                        r"is .*ckpt\.pt \(epoch 1\)\n", err), err
    assert int(re.search(r"step (\d+)", err).group(1)) > 10  # a step of the second epoch
    after = _weights(tmp_path / "o" / "ckpt.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the NaN weights were never saved


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
    out = tmp_path / "o"
    cmd = [sys.executable, "train.py", *TINY, "--data-dir", data_dir, "--out-dir", str(out),
           "--epochs", "50",
           "--log-interval", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env())
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            p.send_signal(__import__("signal").SIGTERM)
    assert p.wait(timeout=120) == 0, "".join(lines)
    assert any(re.match(r"stopped \(SIGTERM\) at step \d+: saved",
                        x) for x in lines), "".join(lines[-5:])
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert 3 <= ck["step"] < 500 and ck["epoch"] == ck["step"] // 10


STANDARD = TINY[:6] + ["--train-per-class", "4", "--val-per-class", "2", "--batch-size", "20",
                       "--head-epochs", "2", "--dataset", "synthetic", "--device", "cpu",
                       "--split", "standard", "--model", "cdeit", "--distill", "hard",
                       "--log-interval", "1"]  # 40 clean train rows -> 2 steps per epoch


def test_standard_split_fresh_corruptions_live_teacher(tmp_path, data_dir, monkeypatch, capsys):
    """--split standard: every batch is corrupted by data.draw_corruptions before augmentation, its
    drawn types are the corruption-token targets, and the teacher runs live on the corrupted
    batch."""
    draws, real_draw = [], data.draw_corruptions
    real_augment_call = augment.Augment.__call__

    def spy(images, generator):
        out = real_draw(images, generator)
        draws.append((images.clone(), out[0].clone(), out[1].clone()))
        return out

    seen_types = []

    def augment_spy(self, images, labels, types, generator=None):
        seen_types.append(types.clone())
        return real_augment_call(self, images, labels, types, generator=generator)
    monkeypatch.setattr(data, "draw_corruptions", spy)
    monkeypatch.setattr(augment.Augment, "__call__", augment_spy)
    assert train.main(STANDARD + ["--epochs", "2", "--data-dir", data_dir, "--out-dir",
                                  str(tmp_path / "o")]) == 0
    stdout = capsys.readouterr().out
    assert "teacher: LIVE on every batch (split standard" in stdout
    ck = torch.load(tmp_path / "o" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ck["data_args"]["split"] == "standard" and ck["step"] == 4 and ck["epoch"] == 2
    assert "corrupt" in ck["rng"]["ranks"][0]  # the corruption generator resumes exactly
    # the teacher's head was fitted with one fixed corrupted draw of the train rows + the 4
    # training steps
    step_draws = draws[-4:]
    assert len(step_draws) == 4 and all(len(d[0]) == 20 for d in step_draws)
    for (clean, corrupted, types), t in zip(step_draws, seen_types[-4:]):
        assert torch.equal(t, types)  # the token's targets are the drawn types
        changed = (clean != corrupted).flatten(1).any(1)
        assert changed[types > 0].float().mean() > 0.5 and not changed[types == 0].any()
    all_types = torch.cat([d[2] for d in step_draws])
    assert len(all_types.unique()) >= 4  # draws span several types, not one fixed type
    # the training rows are clean in the split and corrupted afresh each epoch: the same row gets
    # different draws in epochs 1 and 2
    e1, e2 = torch.cat([d[2] for d in step_draws[:2]]), torch.cat([d[2] for d in step_draws[2:]])
    assert not torch.equal(e1, e2)


def test_standard_split_resume_is_bit_identical(tmp_path, data_dir):
    base = STANDARD + ["--epochs", "2", "--data-dir", data_dir]
    assert train.main(base + ["--out-dir", str(tmp_path / "a")]) == 0
    assert train.main(base + ["--out-dir", str(tmp_path / "b")], stop_at_step=3) == 0  # mid-epoch 2
    assert train.main(base + ["--out-dir", str(tmp_path / "b"), "--resume"]) == 0
    a, b = _weights(tmp_path / "a" / "ckpt.pt"), _weights(tmp_path / "b" / "ckpt.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_standard_split_default_val_per_class():
    # 45,000 / 5,000 of CIFAR-10 train
    assert train.get_args(["--split", "standard"]).val_per_class == 500
    assert train.get_args(["--split", "standard", "--val-per-class", "100"]).val_per_class == 100
    assert train.get_args([]).val_per_class == 200  # the thesis's mix


def test_compile_modes(monkeypatch):
    """--compile keeps its bare form (torch.compile's default mode); reduce-overhead passes its mode
    (CUDA graphs) to the student and the loss and marks each step's start for the graph replays."""
    assert train.get_args([]).compile == "off"
    assert train.get_args(["--compile"]).compile == "default"
    assert train.get_args(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model, loss = object(), train.losses.distillation_loss
    assert train.compile_step(model, loss, "off") == (model, loss) and calls == []
    train.compile_step(model, loss, "default")
    train.compile_step(model, loss, "reduce-overhead")
    assert calls == [{}, {"fullgraph": True}, {"mode": "reduce-overhead"},
                     {"fullgraph": True, "mode": "reduce-overhead"}]
    args = train.get_args(["--model", "vit", "--distill", "none", "--compile", "reduce-overhead"])
    student = create_model("vit", depth=1, embed_dim=32, num_heads=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    train.train_step(student, opt, torch.amp.GradScaler("cpu", enabled=False),
                     train.losses.distillation_loss,
                     x, y, None, None, args, None)
    assert marks == [1]
