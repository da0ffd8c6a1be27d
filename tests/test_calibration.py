"""Temperature scaling: metrics.fit_temperature / type_temperatures, eval.py --calibrate on real
images (fitted on val, reported on test, stored beside the checkpoint), predict.py using it."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from digits_student import MIX, trained_checkpoint

import augment
import data
import eval as ev
import fileio
import metrics
import model as model_lib
import predict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_fit_temperature_and_per_type_fallback():
    """metrics.fit_temperature finds scipy's minimum of the NLL over T; type_temperatures fits the
    types with enough images and falls back to the global T for the others and for a separable
    type."""
    from scipy.optimize import minimize_scalar
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(3000, 10, generator=g, dtype=torch.float64)
    y = torch.multinomial((z / 2.5).softmax(-1), 1, generator=g)[:, 0]  # drawn from T = 2.5
    T = metrics.fit_temperature(z, y)
    ref = minimize_scalar(lambda t: metrics.nll(z / t, y), bounds=(0.1, 10), method="bounded",
                          options={"xatol": 1e-8}).x
    assert T == pytest.approx(ref, rel=1e-5) and T == pytest.approx(2.5, rel=0.1)
    types = torch.tensor([0] * 1000 + [1] * 1990 + [2] * 10)
    z[1000:1100] = 20 * F.one_hot(y[1000:1100], 10)  # type 1: 100 images ...
    temps, counts, fitted = metrics.type_temperatures(z[:1100], y[:1100], types[:1100], 3, T,
                                                      min_count=50)
    assert counts.tolist() == [1000, 100, 0]
    assert fitted.tolist() == [True, False, False]  # ... all right: separable
    assert temps[0] == pytest.approx(metrics.fit_temperature(z[:1000], y[:1000]))
    assert temps[1] == temps[2] == T
    scaled = metrics.scale_logits(z[:4], temps, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(scaled[1], z[1] / T) and torch.equal(scaled[0], z[0] / temps[0])


def test_calibrate_on_real_digits(digits_files, tmp_path_factory, tmp_path, capsys, monkeypatch):
    """eval.py --calibrate: temperatures fitted on val, reported on test, stored beside the
    checkpoint (whose bytes do not change); the val-fitted temperatures lower the test NLL (global
    and per predicted type, on the corrupted images too); predict.py then uses the per-type
    temperatures; a sidecar for other weights is refused. The mix is built once for both splits."""
    root = digits_files
    ckpt = tmp_path / "cdeit.pt"  # a copy: the sidecar is written beside it
    shutil.copy(trained_checkpoint(root, tmp_path_factory), ckpt)
    before = fileio.sha256_file(ckpt)
    out = tmp_path / "e.json"
    builds, build_mix = [], data.build_mix
    monkeypatch.setattr(data, "build_mix", lambda *a, **k: builds.append(a) or build_mix(*a, **k))
    assert ev.main([str(ckpt), "--calibrate", "--json", str(out), "--device", "cpu"]) == 0
    assert len(builds) == 1
    assert "temperature scaling fitted on val" in capsys.readouterr().out
    assert fileio.sha256_file(ckpt) == before
    t = model_lib.load_temperatures(str(ckpt), 11)
    r = json.loads(out.read_text())
    rep = r["calibration_scaling"]
    assert rep["overall"]["global"]["nll"] < rep["overall"]["none"]["nll"]
    assert rep["corrupted"]["global"]["nll"] < rep["corrupted"]["none"]["nll"]
    assert rep["corrupted"]["per_type"]["nll"] < rep["corrupted"]["none"]["nll"]
    assert any(t["fitted"]) and set(rep["overall"]) == {"none", "global", "per_type"}
    assert len(rep["cells"]) == 1 + 10 * 5 and sum(c["n"] for c in rep["cells"]) == r["n"]
    # predict.py picks each image's temperature by its predicted corruption type
    test = data.build_mix(str(root), **MIX)["test"]
    np.save(tmp_path / "x.npy", test["images"][:64].permute(0, 2, 3, 1).numpy())
    argv = [str(ckpt), str(tmp_path / "x.npy"), "--json", str(tmp_path / "p.json"),
            "--device", "cpu"]
    assert predict.main(argv) == 0
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["calibration"] == "per-type"
    net, _ = model_lib.load_student(str(ckpt))
    with torch.no_grad():
        z = net(augment.normalize(test["images"][:64])).double()
    assert len(p["predictions"]) == 64
    for rec, zi in zip(p["predictions"], z, strict=True):
        T = t["per_type"][rec["corruption"]["index"]]
        assert rec["temperature"] == pytest.approx(T)
        assert rec["top"][0]["p"] == pytest.approx(float((zi / T).softmax(-1).max()), abs=1e-6)
    # other weights beside the old sidecar: refused, naming it
    other = tmp_path / "other.pt"
    _, ck = model_lib.load_student(str(ckpt))
    torch.save(dict(ck, epoch=2), other)
    shutil.copy(model_lib.temperature_path(str(ckpt)), model_lib.temperature_path(str(other)))
    capsys.readouterr()
    assert predict.main([str(other), str(tmp_path / "x.npy"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0], err
    assert model_lib.temperature_path(str(other)) in err[0], err
