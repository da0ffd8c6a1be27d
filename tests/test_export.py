"""export.py: the ONNX and TorchScript files give PyTorch's eval logits; bad options refused."""
import json

import numpy as np
import pytest
import torch
from digits_student import ARGS, MIX, save_ckpt, trained_checkpoint

import augment
import data
import export
import model as model_lib
import predict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits(digits_files, tmp_path_factory):
    """-> (data folder, checkpoint of the CdeiT trained on the digits)."""
    return digits_files, trained_checkpoint(digits_files, tmp_path_factory)


@pytest.mark.parametrize("name", ["cdeit", "deit"])
def test_export_onnx_matches_pytorch(name, digits, tmp_path, capsys):
    """The ONNX file, run by onnxruntime on a batch of real digit images of another batch size than
    the export's, gives PyTorch's eval logits (and CdeiT's corruption logits) to 1e-4; so does the
    TorchScript file."""
    import onnxruntime as ort
    root, ckpt = digits
    if name == "deit":  # an untrained DeiT: the class-logits-only output
        ckpt = tmp_path / "deit.pt"
        save_ckpt(ckpt, model_lib.create_model("deit", **ARGS).eval(), "deit", root)
    onnx_path, ts_path = tmp_path / "m.onnx", tmp_path / "m.ts"
    rc = export.main([str(ckpt), "--onnx", str(onnx_path), "--torchscript", str(ts_path)])
    assert rc == 0, capsys.readouterr().err
    x = data.build_mix(root, **MIX)["test"]["images"][:37]
    net, _ = model_lib.load_student(str(ckpt))
    with torch.no_grad():
        want = [net(augment.normalize(x))]
        if name == "cdeit":
            want.append(net.forward_heads(augment.normalize(x)).corr)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = ["class_logits"] + (["corruption_logits"] if name == "cdeit" else [])
    assert [o.name for o in sess.get_outputs()] == names
    got = sess.run(None, {"images": x.numpy()})
    ts = export.load_torchscript(ts_path.read_bytes())
    with torch.no_grad():
        got_ts = ts(x)
    got_ts = got_ts if isinstance(got_ts, tuple) else (got_ts,)
    assert len(got) == len(got_ts) == len(want)
    for g, t, w in zip(got, got_ts, want, strict=True):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(t.numpy(), w.numpy(), atol=1e-4, rtol=0)
    if name == "deit":  # predict.py on a student without the corruption token: classes only
        np.save(tmp_path / "x.npy", x[:5].permute(0, 2, 3, 1).numpy())
        argv = [str(ckpt), str(tmp_path / "x.npy"), "--json", str(tmp_path / "p.json"),
                "--device", "cpu"]
        assert predict.main(argv) == 0
        p = json.loads((tmp_path / "p.json").read_text())
        assert p["calibration"] == "none" and not any("corruption" in r for r in p["predictions"])
        assert [r["top"][0]["index"] for r in p["predictions"]] == want[0][:5].argmax(-1).tolist()


def test_export_refuses_bad_input(digits, tmp_path, capsys):
    _, ckpt = digits
    onnx = str(tmp_path / "m.onnx")
    for argv, needle in (([str(ckpt)], "--onnx"),
                         ([str(ckpt), "--onnx", str(tmp_path / "no" / "m.onnx")], "--onnx"),
                         ([str(tmp_path / "nope.pt"), "--onnx", onnx], "nope.pt")):
        assert export.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "m.onnx").exists()
