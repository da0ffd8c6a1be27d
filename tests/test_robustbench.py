"""eval.py --benchmark cifar10c --robustbench FILE: RobustBench's model-info JSON and its
unaggregated results CSV, equal to eval.py's own --json numbers."""
import json

import numpy as np
import pytest
from digits_student import trained_checkpoint

import eval as ev

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# RobustBench's order of the 15 CIFAR-10-C corruptions in its unaggregated_results.csv files
ORDER = ["shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur",
         "brightness", "fog", "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast",
         "jpeg_compression", "elastic_transform"]


def test_robustbench_files(digits_files, tmp_path_factory, tmp_path, capsys):
    """RobustBench's model-info keys (their ModelInfo / model_info/cifar10/corruptions/*.json),
    accuracies as percent strings, and their unaggregated_results.csv layout, all equal to
    eval.py's own --json numbers; --robustbench without --benchmark is refused."""
    ckpt = trained_checkpoint(digits_files, tmp_path_factory)
    js, rb = tmp_path / "e.json", tmp_path / "Ours2026Cdeit.json"
    assert ev.main([str(ckpt), "--benchmark", "cifar10c", "--json", str(js),
                    "--robustbench", str(rb), "--device", "cpu"]) == 0
    r, info = json.loads(js.read_text()), json.loads(rb.read_text())
    assert list(info) == ["link", "name", "authors", "additional_data", "number_forward_passes",
                          "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                          "corruptions_acc"]
    assert info["dataset"] == "cifar10" and info["eps"] is None and info["additional_data"] is True
    assert info["clean_acc"] == f"{100 * r['clean_accuracy']:.2f}"
    assert info["corruptions_acc"] == f"{100 * r['robustbench_accuracy']:.2f}"
    rows = (tmp_path / "Ours2026Cdeit_unaggregated_results.csv").read_text().splitlines()
    assert len(rows) == 3
    names, sevs, vals = (row.split(",") for row in rows)
    assert names[0] == sevs[0] == "" and vals[0] == "Ours2026Cdeit"
    assert names[1::5] == ORDER and sevs[1:] == [str(s) for _ in range(15) for s in range(1, 6)]
    for i, (c, s) in enumerate(zip(names[1:], sevs[1:], strict=True)):
        assert float(vals[1 + i]) == pytest.approx(r["per_corruption"][c][int(s) - 1], abs=5e-5)
    assert np.mean([float(v) for v in vals[1:]]) == pytest.approx(r["robustbench_accuracy"],
                                                                  abs=1e-4)
    assert ev.main([str(ckpt), "--robustbench", str(rb), "--device", "cpu"]) == 2  # no --benchmark
    assert "--robustbench" in capsys.readouterr().err
