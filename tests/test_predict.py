"""predict.py: images, folders, .npy arrays and CIFAR batches in; the student's top-k classes and,
for CdeiT, the corruption token's type out; bad inputs one line each; options refused up front."""
import json

import numpy as np
import pytest
import torch
from digits_student import MIX, trained_checkpoint

import augment
import data
import model as model_lib
import predict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits(digits_files, tmp_path_factory):
    """-> (data folder, checkpoint of the CdeiT trained on the digits)."""
    return digits_files, trained_checkpoint(digits_files, tmp_path_factory)


def test_predict_digit_pngs_and_bad_inputs(digits, tmp_path, capsys):
    """PNGs written from the digits' test images (32x32 RGB, the same as grey 'L' PNGs, one 2x
    upscaled to 64x64) and a .npy of them give the model's own predictions; bad inputs are one line
    each, every other image is still predicted, in input order, and the exit code is 1."""
    from PIL import Image
    root, ckpt = digits
    test = data.build_mix(str(root), **MIX)["test"]
    clean = torch.nonzero(test["types"] == 0).flatten()[:40]
    imgs, folder = test["images"][clean], tmp_path / "pngs"
    (folder / "grey").mkdir(parents=True)
    for i, x in enumerate(imgs):
        hwc = x.permute(1, 2, 0).numpy()
        Image.fromarray(hwc).save(folder / f"{i:03d}.png")
        Image.fromarray(hwc[..., 0]).save(folder / "grey" / f"{i:03d}.png")  # grey: R = G = B
    big = Image.fromarray(imgs[0].permute(1, 2, 0).numpy()).resize((64, 64), Image.NEAREST)
    big.save(tmp_path / "big.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "rgba.npy", np.zeros((2, 32, 32, 4), np.uint8))
    np.save(tmp_path / "ok.npy", imgs[:3].permute(0, 2, 3, 1).numpy())
    out = tmp_path / "p.json"
    inputs = [folder, tmp_path / "empty", tmp_path / "rgba.npy", tmp_path / "big.png",
              tmp_path / "missing.png", tmp_path / "ok.npy"]
    rc = predict.main([str(ckpt), *map(str, inputs), "--json", str(out),
                       "--csv", str(tmp_path / "p.csv"), "--batch-size", "16", "--device", "cpu",
                       "--no-calibration"])
    cap = capsys.readouterr()
    assert rc == 1
    bad = [ln for ln in cap.err.splitlines()
           if not ln.startswith(f"predict.py: {ckpt}") and "images predicted" not in ln]
    for name in ("broken.png", "empty", "rgba.npy", "missing.png"):
        assert sum(name in ln for ln in bad) == 1, (name, bad)
    assert len(bad) == 4, bad
    res = json.loads(out.read_text())
    names = [r["input"] for r in res["predictions"]]
    want = [str(folder / f"{i:03d}.png") for i in range(40)]
    want += [str(folder / "grey" / f"{i:03d}.png") for i in range(40)]
    want += [str(tmp_path / "big.png")] + [f"{tmp_path / 'ok.npy'}[{i}]" for i in range(3)]
    assert names == want
    assert [e["input"] for e in res["errors"]] == [
        str(folder / "broken.png"), str(tmp_path / "empty"), str(tmp_path / "rgba.npy"),
        str(tmp_path / "missing.png")]
    assert len(cap.out.splitlines()) == len(names)  # one screen line per image
    # the PyTorch model on the same uint8 images: predict.py read, converted and normalised them
    net, _ = model_lib.load_student(str(ckpt))
    with torch.no_grad():
        probs = net(augment.normalize(imgs)).double().softmax(-1)
        types = net.forward_heads(augment.normalize(imgs)).corr.double().softmax(-1)
    for block in (res["predictions"][:40], res["predictions"][40:80]):
        for r, p, t in zip(block, probs, types, strict=True):
            top = r["top"]
            assert top[0]["index"] == int(p.argmax())
            assert top[0]["p"] == pytest.approx(float(p.max()), abs=1e-5)
            assert [c["p"] for c in top] == sorted((c["p"] for c in top), reverse=True)
            assert len(top) == 3
            assert r["corruption"]["type"] == data.TYPES[int(t.argmax())]
            assert r["corruption"]["p_clean"] == pytest.approx(float(t[0]), abs=1e-5)
            warned = int(t.argmax()) != 0 and float(t.max()) >= 0.5
            assert r["corruption"]["shift_warning"] == warned
    labels = test["labels"][clean]
    acc = np.mean([r["top"][0]["index"] == int(y)
                   for r, y in zip(res["predictions"][:40], labels, strict=True)])
    assert acc >= 0.5, acc  # real digits, far above chance (0.1)
    up = res["predictions"][80]  # 2x nearest upscale, antialiased back down: the same digit
    assert up["top"][0]["index"] == res["predictions"][0]["top"][0]["index"]
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0].split(",") == predict.CSV_FIELDS and len(rows) == 1 + len(names)


def test_predict_refuses_bad_options_and_checkpoints(digits, tmp_path, capsys):
    _, ckpt = digits
    png = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(png)
    head = tmp_path / "head.pt"
    torch.save({"kind": "cdeit-kit/teacher-head", "version": 1}, head)
    no_dir = str(tmp_path / "no" / "x.json")
    for argv, needle in (([str(ckpt), str(png), "--top-k", "0"], "--top-k"),
                         ([str(ckpt), str(png), "--shift-threshold", "1.5"], "--shift-threshold"),
                         ([str(ckpt), str(png), "--json", no_dir], "--json"),
                         ([str(head), str(png)], str(head)), ([str(png), str(png)], str(png))):
        assert predict.main(argv + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and err[0].startswith("predict.py: error:"), err
