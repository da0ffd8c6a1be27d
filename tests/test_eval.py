"""eval.py: metrics on hand-computed values, then the command line end to end on synthetic files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import augment
import corruptions
import data
import eval as ev
import metrics
import teacher as teacher_lib
from model import create_model, load_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}
DATA_ARGS = {"split": "paper", "seed": 0, "train_per_class": 20, "val_per_class": 5,
             "test_per_class": 5}
KEYS = ["accuracy", "top5", "nll", "ece", "per_type", "per_severity", "clean_error", "mce",
        "mce_vs_baseline", "relative_mce", "corruption_accuracy", "token_similarity",
        "confusion_matrix", "head_accuracy", "checkpoint", "model_name", "split", "data_args",
        "corruption_errors", "images_per_s"]


# ----------------------------------------------------------------------------- end to end

def make_ckpt(path, name, root, data_args=DATA_ARGS, seed=0, train_on=None, **extra):
    """A checkpoint in train.py's format; train_on=(images, labels): a few steps on them first, so
    that predictions (and errors) differ between images instead of one class everywhere."""
    torch.manual_seed(seed)
    net = create_model(name, **TINY)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3 if train_on else 1e-3)
    if train_on:
        x, y = train_on
        for i in range(0, len(x), 50):
            out = net(augment.normalize(x[i:i + 50]))  # train mode: Logits
            torch.nn.functional.cross_entropy(out.cls, y[i:i + 50]).backward()
            opt.step()
            opt.zero_grad()
    else:  # one step, so the optimizer has a state
        net(torch.randn(2, 3, 32, 32)).cls.sum().backward()
        opt.step()
        opt.zero_grad()
    ck = {"kind": "cdeit-kit/student", "version": 1, "model_name": name,
          "model_args": dict(TINY, layout="thesis"), "model": net.state_dict(),
          "optimizer": opt.state_dict(), "epoch": 1, "step": 1,
          "rng": {"torch": torch.get_rng_state()},
          "config": {"model": name, "distill": "hard" if name != "vit" else "none"},
          "data_args": dict(root=str(root), **data_args), "dataset": "synthetic",
          "best_val_accuracy": 0.0, "teacher": None}
    ck.update(extra)
    torch.save(ck, path)
    return net.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    data.write_synthetic(d / "data", train_per_class=50, test_per_class=20)
    paths = {n: d / f"{n}.pt" for n in ("vit", "deit", "cdeit")}
    nets = {n: make_ckpt(p, n, d / "data", seed=i) for i, (n, p) in enumerate(paths.items())}
    return d, paths, nets


def run_cli(*args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
    return p.returncode, p.stdout, p.stderr


def test_cli_end_to_end(files):
    d, paths, nets = files
    out = d / "cdeit.json"
    rc, so, se = run_cli(paths["cdeit"], "--json", out, "--device", "cpu")
    assert rc == 0, se
    assert "img/s" in so and "corruption-token confusion" in so
    r = json.loads(out.read_text())
    for k in KEYS:
        assert k in r, k
    assert r["model_name"] == "cdeit" and r["split"] == "test"
    assert r["data_args"]["split"] == "paper"
    assert r["n"] == 11 * 10 * DATA_ARGS["test_per_class"]
    assert list(r["per_type"]) == data.TYPES
    assert list(r["per_severity"]) == ["1", "2", "3", "4", "5"]
    assert len(r["confusion_matrix"]) == 11 and sum(map(sum, r["confusion_matrix"])) == r["n"]
    assert set(r["head_accuracy"]) == {"cls", "dist", "cls_corr", "combined"}
    assert r["head_accuracy"]["combined"] == r["accuracy"]
    assert r["mce_vs_baseline"] is None and r["relative_mce"] is None  # no baseline given
    # the headline mCE: the mean corruption error over the corruptions, no baseline model
    errs = [1 - r["per_type"][t] for t in data.TYPES[1:]]
    assert r["mce"] == pytest.approx(sum(errs) / len(errs))
    assert "mean_corruption_error" not in r  # one key per metric

    # the same numbers computed here, independently of eval.py's batching and token path
    test = data.build_mix(**r["data_args"])["test"]
    with torch.no_grad():
        logits = nets["cdeit"](augment.normalize(test["images"]))
        tok = nets["cdeit"].forward_tokens(augment.normalize(test["images"]))
    y = test["labels"]
    assert r["accuracy"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    nll = float(torch.nn.functional.cross_entropy(logits, y))
    assert r["nll"] == pytest.approx(nll, rel=1e-4)
    cos = torch.nn.functional.cosine_similarity(tok["cls"], tok["corr"], dim=-1).mean()
    assert r["token_similarity"]["cls_corr"] == pytest.approx(float(cos), abs=1e-5)
    types_pred = nets["cdeit"].head_corr(tok["corr"]).argmax(-1)
    type_acc = float((types_pred == test["types"]).float().mean())
    assert r["corruption_accuracy"] == pytest.approx(type_acc)


def test_several_checkpoints_with_baseline(files, capsys):
    d, paths, _ = files
    base = d / "vit.json"
    assert ev.main([str(paths["vit"]), "--split", "val", "--json", str(base), "--device", "cpu",
                    "--batch-size", "128"]) == 0
    out = d / "all.json"
    assert ev.main([str(paths["vit"]), str(paths["deit"]), str(paths["cdeit"]), "--split", "val",
                    "--baseline", str(base), "--json", str(out), "--device", "cpu"]) == 0
    so = capsys.readouterr().out
    assert "mCE %" in so and "mCE vs ViT %" in so
    assert "error % per type" in so and "each head alone" in so
    assert f"Eq. 10 against vit/none ({paths['vit']})" in so  # the baseline, named
    rs = json.loads(out.read_text())
    assert [r["model_name"] for r in rs] == ["vit", "deit", "cdeit"]
    b = json.loads(base.read_text())
    # vs itself; relative mCE too, unless the baseline does not degrade
    assert rs[0]["mce_vs_baseline"] == pytest.approx(1.0)
    why = metrics.relative_mce_undefined(b["corruption_errors"], b["clean_error"])
    assert rs[0]["relative_mce_undefined"] == why
    assert rs[0]["relative_mce"] is None if why else rs[0]["relative_mce"] == pytest.approx(1.0)
    assert ("relative mCE undefined: " + why in so) if why else "undefined" not in so
    want = metrics.mce(rs[2]["corruption_errors"], b["corruption_errors"])
    assert rs[2]["mce_vs_baseline"] == pytest.approx(want)
    assert rs[0]["token_similarity"] == {"cls_dist": None, "cls_corr": None}
    assert rs[1]["token_similarity"]["cls_dist"] is not None
    assert rs[1]["corruption_accuracy"] is None


def test_teacher_head(files):
    d, _, _ = files
    targs = {"depth": 1, "embed_dim": 48, "num_heads": 2, "img_size": 64}
    torch.manual_seed(5)
    teacher = create_model("deit3_small", **targs).eval()
    tdir = d / "teacher"
    tdir.mkdir()
    save_file(teacher.state_dict(), str(tdir / "model.safetensors"))
    W, b = torch.randn(10, 48), torch.randn(10)
    data_args = dict(root=str(d / "data"), **DATA_ARGS)
    mix = data.build_mix(**data_args)
    # the mix it belongs to
    ident = teacher_lib.identity("-", targs, mix, data_args, "bicubic", 0, 0, None)
    head = {"kind": "cdeit-kit/teacher-head", "version": 1, "identity": ident, "weight": W,
            "bias": b, "teacher_path": str(tdir / "model.safetensors"), "teacher_sha256": "-",
            "teacher_args": targs, "data_args": data_args, "resize": "bicubic",
            "val_accuracy": 0.0, "test_accuracy": 0.0}
    head_path = str(tdir / "teacher_head.pt")
    torch.save(head, tdir / "teacher_head.pt")
    test = mix["test"]
    with torch.no_grad():
        view = augment.teacher_view(test["images"], size=64, mode="bicubic")
        f = teacher.forward_features(view)[:, 0]
    expect = float(((f @ W.T + b).argmax(-1) == test["labels"]).float().mean())
    # 1) no cached features: DeiT-III is rebuilt and run on the teacher view
    assert ev.main(["--teacher", head_path, "--json", str(d / "t1.json"), "--device", "cpu"]) == 0
    r = json.loads((d / "t1.json").read_text())
    assert r["model_name"] == "deit3_small" and r["accuracy"] == pytest.approx(expect)
    assert r["teacher_source"].endswith("model.safetensors")
    # 2) cached features beside the head (here deliberately different, so the source is visible)
    f2 = torch.randn(len(f), 48).half()
    torch.save({"identity": ident, "features": f2, "labels": test["labels"],
                "sources": test["sources"]}, tdir / "features_test.pt")
    assert ev.main(["--teacher", head_path, "--json", str(d / "t2.json"), "--device", "cpu"]) == 0
    r2 = json.loads((d / "t2.json").read_text())
    assert r2["teacher_source"].endswith("features_test.pt")
    right = (f2.float() @ W.T + b).argmax(-1) == test["labels"]
    assert r2["accuracy"] == pytest.approx(float(right.float().mean()))


def test_benchmark_cifar10c(files, tmp_path, capsys):
    _, paths, nets = files
    small = tmp_path / "data"  # a smaller CIFAR-10-C (40 test images -> 200 rows per file)
    data.write_synthetic(small, train_per_class=10, test_per_class=4, seed=1)
    out = tmp_path / "bench.json"
    assert ev.main([str(paths["deit"]), "--benchmark", "cifar10c", "--extra", "--data-dir",
                    str(small), "--json", str(out), "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "NOT held out" in cap.err and "73.46" in cap.out
    r = json.loads(out.read_text())
    assert list(r["per_corruption"]) == corruptions.CORRUPTIONS + ev.EXTRA and r["n"] == 40
    # the mean is over the 15 only
    cells = [a for c in corruptions.CORRUPTIONS for a in r["per_corruption"][c]]
    assert len(cells) == 75 and r["accuracy"] == pytest.approx(sum(cells) / 75)
    assert list(r["corruption_errors"]) == corruptions.CORRUPTIONS
    # one cell by hand: fog at severity 3 (rows 2n..3n of fog.npy)
    x, y = data.read_cifar10c(small, "fog")
    rows = torch.from_numpy(x[80:120].copy()).permute(0, 3, 1, 2)
    with torch.no_grad():
        pred = nets["deit"](augment.normalize(rows)).argmax(-1)
        acc = (pred == torch.from_numpy(y[80:120])).float().mean()
    assert r["per_corruption"]["fog"][2] == pytest.approx(float(acc))


def test_standard_split_checkpoint(files, tmp_path, capsys):
    """A checkpoint trained on the standard split is tested, by default, on clean CIFAR-10
    test + the real CIFAR-10-C files, 15 x 5, with seen and unseen corruption errors apart."""
    _, paths, _ = files
    root = tmp_path / "data"  # 30 test images -> 150 rows per CIFAR-10-C file
    data.write_synthetic(root, train_per_class=25, test_per_class=3, seed=2)
    std = tmp_path / "std.pt"
    cifar = data.read_cifar10(root)
    train = (torch.from_numpy(cifar["train_images"]).permute(0, 3, 1, 2).repeat(2, 1, 1, 1),
             torch.from_numpy(cifar["train_labels"]).repeat(2))
    net = make_ckpt(std, "cdeit", root, data_args=dict(DATA_ARGS, split="standard"), seed=7,
                    train_on=train)
    out = tmp_path / "std.json"
    assert ev.main([str(std), "--json", str(out), "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert "NOT held out" not in cap.err and "unseen" in cap.out
    r = json.loads(out.read_text())
    for k in KEYS + ["seen_corruption_error", "unseen_corruption_error", "robustbench_accuracy",
                     "per_corruption"]:
        assert k in r, k
    assert r["split"] == "test" and r["benchmark"] == "cifar10c" and r["n"] == 30
    assert list(r["per_corruption"]) == corruptions.CORRUPTIONS
    assert list(r["corruption_errors"]) == corruptions.CORRUPTIONS

    # every cell recomputed here from the files, with the model's own eval forward
    y = torch.from_numpy(cifar["test_labels"])
    def predict(x):
        return net(augment.normalize(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))).argmax(-1)

    with torch.no_grad():
        clean_err = float((predict(cifar["test_images"]) != y).double().mean())
        wrong = {c: predict(data.read_cifar10c(root, c)[0]) != y.repeat(5)
                 for c in corruptions.CORRUPTIONS}
    err = {c: w.view(5, -1).double().mean(1).tolist() for c, w in wrong.items()}
    for c in corruptions.CORRUPTIONS:
        assert r["corruption_errors"][c] == pytest.approx(err[c], abs=1e-12), c
        assert r["per_corruption"][c] == pytest.approx([1 - e for e in err[c]], abs=1e-12), c
    # the errors differ: subsets give other means
    assert len({round(sum(e), 6) for e in err.values()}) > 5
    mean_err = lambda cs: sum(sum(err[c]) / 5 for c in cs) / len(cs)
    assert len(corruptions.SEEN) == 10 and len(corruptions.UNSEEN) == 5
    assert r["seen_corruption_error"] == pytest.approx(mean_err(corruptions.SEEN), abs=1e-12)
    assert r["unseen_corruption_error"] == pytest.approx(mean_err(corruptions.UNSEEN), abs=1e-12)
    assert r["mce"] == pytest.approx(mean_err(corruptions.CORRUPTIONS), abs=1e-12)
    assert r["robustbench_accuracy"] == pytest.approx(1 - mean_err(corruptions.CORRUPTIONS),
                                                      abs=1e-12)
    assert r["accuracy"] == r["robustbench_accuracy"]
    assert r["clean_error"] == pytest.approx(clean_err, abs=1e-12)
    per_severity = {str(s + 1): 1 - sum(err[c][s] for c in corruptions.CORRUPTIONS) / 15
                    for s in range(5)}
    assert r["per_severity"] == pytest.approx(per_severity, abs=1e-12)
    # the corruption token is scored on clean + seen images only (it has no class for the unseen 5)
    assert sum(map(sum, r["confusion_matrix"])) == 30 * (1 + 10 * 5)

    # side by side with a paper-split checkpoint: seen / unseen columns, per-type rows of both
    assert ev.main([str(std), str(paths["vit"]), "--device", "cpu"]) == 0
    so = capsys.readouterr().out
    assert "seen err %" in so and "unseen err %" in so
    assert "C10-C %" in so and "acc %" in so
    assert "impulse_noise" in so and "jpeg_compression" in so
    # --split val: the standard split's val rows from build_mix (fixed corruption draw), not
    # CIFAR-10-C
    if "standard" in getattr(data, "SPLITS", ()):
        assert ev.main([str(std), "--split", "val", "--json", str(out), "--device", "cpu"]) == 0
        v = json.loads(out.read_text())
        assert v["split"] == "val" and v["benchmark"] is None
        assert v["n"] == 10 * DATA_ARGS["val_per_class"]
        assert v["unseen_corruption_error"] is None and "per_corruption" not in v


# ----------------------------------------------------------------------------- bad input

def _bad(args, capsys, must_name):
    rc = ev.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and str(must_name) in err, err
    return err


def test_bad_inputs(files, tmp_path, capsys):
    d, paths, _ = files
    out = tmp_path / "out.json"
    good = paths["vit"].read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good[: len(good) // 2])
    _bad([tmp_path / "missing.pt", "--json", out], capsys, "missing.pt")
    assert "truncated" in _bad([trunc, "--json", out], capsys, trunc)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "cdeit-kit/student", "x": Evil()}, evil)
    assert "weights_only" in _bad([evil, "--json", out], capsys, evil)
    assert not marker.exists()

    bare = tmp_path / "bare.pt"
    torch.save(create_model("vit", **TINY).state_dict(), bare)
    assert "kind" in _bad([bare, "--json", out], capsys, bare)
    head = tmp_path / "head.pt"
    torch.save({"kind": "cdeit-kit/teacher-head", "version": 1}, head)
    assert "--teacher" in _bad([head, "--json", out], capsys, head)
    other = tmp_path / "other.pt"
    make_ckpt(other, "vit", d / "data")
    ck = torch.load(other, weights_only=True)
    ck["model"].pop("blocks.1.norm2.bias")
    torch.save(ck, other)
    assert "blocks.1.norm2.bias" in _bad([other, "--json", out], capsys, other)
    assert not out.exists()

    # a baseline from another split: refused before anything is evaluated; an old output survives
    val = tmp_path / "val.json"
    argv = [str(paths["vit"]), "--split", "val", "--json", str(val), "--device", "cpu"]
    assert ev.main(argv) == 0
    out.write_text("old")
    capsys.readouterr()
    assert "split" in _bad([paths["deit"], "--baseline", val, "--json", out], capsys, val)
    assert out.read_text() == "old"
    moved = tmp_path / "moved.pt"
    make_ckpt(moved, "vit", d / "data", data_args=dict(DATA_ARGS, split="grouped"))
    assert "grouped" in _bad([moved, "--split", "val", "--baseline", val], capsys, val)
    # no temp files left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    _bad([], capsys, "at least one checkpoint")
    _bad([paths["vit"], "--json", tmp_path / "no" / "such" / "dir.json"], capsys, "dir.json")
    if not torch.cuda.is_available():
        _bad([paths["vit"], "--device", "cuda"], capsys, "no CUDA device is available")


def test_bad_input_cli_one_line(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_text("not a checkpoint")
    rc, _, se = run_cli(p, "--json", tmp_path / "o.json")
    assert rc != 0 and len(se.strip().splitlines()) == 1
    assert "junk.pt" in se and "Traceback" not in se
    assert sorted(os.listdir(tmp_path)) == ["junk.pt"]


def test_plot_without_matplotlib(files, tmp_path, capsys, monkeypatch):
    _, paths, _ = files
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    _bad([paths["vit"], "--plot", tmp_path / "p.png", "--json", tmp_path / "p.json"], capsys,
         "requirements-plot.txt")
    assert os.listdir(tmp_path) == []


def test_smoke_run_checkpoint_evaluates(request, tmp_path):
    """The end-to-end check on the checkpoint of `python train.py --model cdeit --distill hard
    --dataset synthetic --device cpu`. tests/test_train.py already runs it, so it is not repeated
    here: this test uses a session fixture `smoke_run` (the run's out dir) when tests/conftest.py
    provides one, and says it is skipped otherwise."""
    try:
        out = request.getfixturevalue("smoke_run")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no session fixture smoke_run (train.py's out dir)")
    ckpt = os.path.join(str(out), "best.pt")
    head = torch.load(ckpt, map_location="cpu", weights_only=True)["teacher"]["head"]
    out = tmp_path / "smoke.json"
    rc, _, se = run_cli(ckpt, "--teacher", head, "--json", out, "--device", "cpu")
    assert rc == 0, se
    student, teacher = json.loads(out.read_text())
    for k in KEYS:
        assert k in student, k
    assert student["model_name"] == "cdeit" and teacher["model_name"] == "deit3_small"
    fitted = torch.load(head, weights_only=True)["test_accuracy"]
    assert teacher["accuracy"] == pytest.approx(fitted)


def test_plot_png(files, tmp_path):
    pytest.importorskip("matplotlib")  # requirements-plot.txt (requirements-test.txt includes it)
    _, paths, _ = files
    png = tmp_path / "p.png"
    assert ev.main([str(paths["vit"]), str(paths["cdeit"]), "--split", "val", "--plot", str(png),
                    "--device", "cpu"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_checkpoint_without_layout_loads_as_built(tmp_path):
    """A checkpoint whose model_args predate `layout` was built in timm's layout (final norm; vit
    with the MLP head it recorded): eval.py rebuilds exactly that, same logits."""
    torch.manual_seed(0)
    net = create_model("vit", layout="timm", head="mlp", **TINY).eval()
    torch.save({"kind": "cdeit-kit/student", "version": 1, "model_name": "vit",
                "model_args": dict(TINY, head="mlp"), "model": net.state_dict(), "data_args": {}},
               tmp_path / "old.pt")
    got, ck = load_student(str(tmp_path / "old.pt"))  # the one student loader eval.py uses
    assert got.cfg.layout == "timm" and ck["model_args"]["layout"] == "timm"
    assert "norm.weight" in got.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(got(x), net(x))
