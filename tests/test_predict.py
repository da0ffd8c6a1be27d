"""predict.py: images, folders, .npy arrays and CIFAR batches in; the student's top-k classes and,
for CdeiT, the corruption token's type out; bad inputs one line each; options refused up front."""
import json
import re
import resource
import struct
import time
import zlib

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
    (folder / "cut.png").write_bytes((folder / "000.png").read_bytes()[:70])  # header, cut data
    (folder / "nothing" / "deeper").mkdir(parents=True)  # no images: skipped, said once
    (folder / "nothing" / "deeper" / "notes.txt").write_text("not an image")
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
    lines = cap.err.splitlines()
    summary = r"predict\.py: 84 images predicted in [\d.]+ s \([\d,]+ img/s\), 5 inputs failed, "
    assert re.fullmatch(summary + r"[\d,]+ with a shift warning", lines[-1]), lines[-1]
    bad = lines[1:-1]
    assert lines[0].startswith(f"predict.py: {ckpt}: cdeit on cpu, calibration: none"), lines
    for name in ("broken.png", "cut.png", "empty", "rgba.npy", "missing.png", "nothing"):
        assert sum(name in ln for ln in bad) == 1, (name, bad)
    assert len(bad) == 6, bad
    assert f"predict.py: {folder / 'nothing'}: no png/jpg/jpeg/webp/gif files in it, skipped" in bad
    broken = next(ln for ln in bad if "broken.png" in ln)
    assert broken.endswith("broken.png: not a PNG, JPEG, WebP or GIF image (by its content)")
    cut = next(ln for ln in bad if "cut.png" in ln)  # the decoder's whole message, on one line
    assert "unreadable image (" in cut and cut.endswith(")") and ".cpp" not in cut, cut
    res = json.loads(out.read_text())
    names = [r["input"] for r in res["predictions"]]
    want = [str(folder / f"{i:03d}.png") for i in range(40)]
    want += [str(folder / "grey" / f"{i:03d}.png") for i in range(40)]
    want += [str(tmp_path / "big.png")] + [f"{tmp_path / 'ok.npy'}[{i}]" for i in range(3)]
    assert names == want
    assert [e["input"] for e in res["errors"]] == [  # the skipped sub-folder is not an error
        str(folder / "broken.png"), str(folder / "cut.png"), str(tmp_path / "empty"),
        str(tmp_path / "rgba.npy"), str(tmp_path / "missing.png")]
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


def exit_code(main, argv):
    """main(argv)'s exit status, whether returned or raised by argparse (cli.Parser)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_predict_refuses_bad_options_and_checkpoints(digits, tmp_path, capsys):
    """Each refused before any work, on one line naming the flag or file, exit 2 (no usage
    block: missing inputs too)."""
    _, ckpt = digits
    png = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(png)
    head = tmp_path / "head.pt"
    torch.save({"kind": "cdeit-kit/teacher-head", "version": 1}, head)
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a checkpoint\n")
    no_dir = str(tmp_path / "no" / "x.json")
    for argv, needle in (([str(ckpt), str(png), "--top-k", "0"], "--top-k"),
                         ([str(ckpt), str(png), "--shift-threshold", "1.5"], "--shift-threshold"),
                         ([str(ckpt), str(png), "--max-pixels", "0"], "--max-pixels"),
                         ([str(ckpt), str(png), "--json", no_dir], "--json"),
                         ([str(ckpt)], "inputs"),
                         ([str(head), str(png)], str(head)), ([str(png), str(png)], str(png)),
                         ([str(text), str(png)], "a text file")):
        assert exit_code(predict.main, argv + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and err[0].startswith("predict.py: error:"), err


def test_top_k_above_the_classes_is_said(digits, tmp_path, capsys):
    """--top-k 20 on 10 classes: one line says all 10 are shown; one image is "1 image"."""
    from PIL import Image
    _, ckpt = digits
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "a.png")
    out = tmp_path / "p.json"
    argv = [str(ckpt), str(tmp_path / "a.png"), "--top-k", "20", "--json", str(out),
            "--device", "cpu", "--no-calibration"]
    assert predict.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert "predict.py: --top-k 20: this checkpoint has 10 classes; showing all 10" in err
    assert err[-1].startswith("predict.py: 1 image predicted in ")
    assert ", 0 inputs failed" in err[-1]
    assert len(json.loads(out.read_text())["predictions"][0]["top"]) == 10


def png_of_zeros(path, w, h):
    """A valid black RGB PNG of w x h pixels, written without compressing w x h x 3 bytes: the
    deflate stream of 1 MiB of zeros, fully flushed (byte-aligned, no history), repeated."""
    raw = (3 * w + 1) * h  # a filter byte per row
    n, rest = divmod(raw, 1 << 20)
    z = zlib.compressobj(9)
    first = z.compress(bytes(1 << 20)) + z.flush(zlib.Z_FULL_FLUSH)
    z = zlib.compressobj(9)
    tail = z.compress(bytes(rest)) + z.flush(zlib.Z_FULL_FLUSH)
    adler = ((raw % 65521) << 16) | 1  # adler32 of zeros: a = 1, b = the count
    stream = first[:2] + first[2:] * n + tail[2:] + b"\x03\x00" + struct.pack(">I", adler)

    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream)
                     + chunk(b"IEND", b""))


def test_decompression_bomb_refused_others_predicted(digits, tmp_path, capsys):
    """A 2.6 MB PNG of 30000 x 30000 pixels (2.7 GB decoded) beside a normal image: refused from
    its header, in well under a second and without the memory, on one line naming it, its size and
    the limit; the normal image is still predicted (exit 1). --max-pixels moves the limit: a
    3000 x 3000 image is refused at 8,999,999 and predicted at 9,000,000."""
    from PIL import Image
    _, ckpt = digits
    folder = tmp_path / "photos"
    folder.mkdir()
    png_of_zeros(folder / "bomb.png", 30000, 30000)
    assert (folder / "bomb.png").stat().st_size < 3_000_000
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "ok.png")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.perf_counter()
    items = list(predict.expand([str(folder / "bomb.png")]))
    assert time.perf_counter() - t0 < 1.0
    assert items[0].image is None and "30000 x 30000" in items[0].error
    out = tmp_path / "p.json"
    argv = [str(ckpt), str(folder), "--json", str(out), "--device", "cpu", "--no-calibration"]
    assert predict.main(argv) == 1
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown < 300 * 1024, f"peak memory grew by {grown / 1024:.0f} MiB"  # decoded: 2.7 GB
    err = capsys.readouterr().err.splitlines()
    line = f"predict.py: {folder / 'bomb.png'}: 30000 x 30000 = 900,000,000 pixels, more than "
    assert line + "--max-pixels 89,478,485; not decoded" in err, err
    res = json.loads(out.read_text())
    assert [r["input"] for r in res["predictions"]] == [str(folder / "ok.png")]
    assert [e["input"] for e in res["errors"]] == [str(folder / "bomb.png")]
    big = tmp_path / "big.png"
    png_of_zeros(big, 3000, 3000)
    argv = [str(ckpt), str(big), "--device", "cpu", "--no-calibration", "--max-pixels"]
    assert predict.main(argv + ["8999999"]) == 1
    assert "more than --max-pixels 8,999,999" in capsys.readouterr().err
    assert predict.main(argv + ["9000000"]) == 0
    assert capsys.readouterr().out.startswith(f"{big}  ")


def test_image_size_from_headers(tmp_path):
    """image_size reads PIL's size from PNG, JPEG (baseline and progressive), WebP (lossy, lossless,
    extended) and GIF headers, counts a GIF's frames, and refuses other content on one line; a
    JPEG whose frame header claims 60000 x 60000 is refused undecoded."""
    from PIL import Image
    img = Image.new("RGB", (37, 23), (10, 200, 30))
    cases = [("a.png", {}), ("b.jpg", {}), ("c.jpg", {"progressive": True}),
             ("d.webp", {"lossless": True}), ("e.webp", {"quality": 80}), ("f.gif", {})]
    for name, kw in cases:
        img.save(tmp_path / name, **kw)
    Image.new("RGBA", (37, 23), (10, 200, 30, 100)).save(tmp_path / "g.webp")  # alpha: VP8X
    assert (tmp_path / "g.webp").read_bytes()[12:16] == b"VP8X"
    for name in [n for n, _ in cases] + ["g.webp"]:
        assert predict.image_size(str(tmp_path / name)) == (37, 23, 1), name
    frames = [Image.new("RGB", (40, 30), (60 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert predict.image_size(str(tmp_path / "anim.gif")) == (40, 30, 3)
    with pytest.raises(predict.InputError, match="a GIF of 3 frames; expected one image"):
        predict.read_image(str(tmp_path / "anim.gif"))
    jpg = bytearray((tmp_path / "b.jpg").read_bytes())
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
    (tmp_path / "bomb.jpg").write_bytes(jpg)
    with pytest.raises(predict.InputError, match=r"60000 x 60000 = 3,600,000,000 pixels"):
        predict.read_image(str(tmp_path / "bomb.jpg"))
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.gif").write_bytes(b"")
    (tmp_path / "cut.gif").write_bytes((tmp_path / "anim.gif").read_bytes()[:40])
    for name, why in (("text.png", "not a PNG, JPEG, WebP or GIF image (by its content)"),
                      ("empty.gif", "an empty file, not an image"),
                      ("cut.gif", "a cut or malformed GIF header")):
        with pytest.raises(predict.InputError) as e:
            predict.image_size(str(tmp_path / name))
        assert str(e.value) == f"{tmp_path / name}: {why}"
