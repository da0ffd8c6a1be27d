"""RobustBench's CIFAR-10-C leaderboard rows the kit cites, and its submission files.

    REFERENCE   the leaderboard rows (mean accuracy % over 15 corruptions x 5 severities)
    files()     eval.py --robustbench: model-info JSON + unaggregated_results.csv for one result
"""
import json
import os

# (method, architecture) -> mean accuracy % over 15 x 5; AugMix has two entries
REFERENCE = [("Standard, WideResNet-28-10", 73.46), ("AugMix, WideResNet-40-2", 88.82),
             ("AugMix, ResNeXt29_32x4d", 89.09), ("PRIME, ResNet-18", 89.05)]
STANDARD, STANDARD_ACCURACY = REFERENCE[0]  # the undefended model eval.py prints beside a result

# the column order of RobustBench's model_info/cifar10/corruptions/unaggregated_results.csv
ORDER = ["shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur",
         "brightness", "fog", "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast",
         "jpeg_compression", "elastic_transform"]


def files(r, path):
    """One eval.py --benchmark cifar10c result r as RobustBench's files: the model-info JSON
    (model_info/cifar10/corruptions/<name>.json: accuracies as percent strings, 2 decimals) at
    path, and beside it <name>_unaggregated_results.csv (a row of corruption names, one of
    severities 1..5, then the model name and the accuracies as fractions).
    -> [(path, text, what)]."""
    name = os.path.splitext(os.path.basename(path))[0]
    info = {"link": None, "name": None, "authors": None,
            # the distilled students learn from an ImageNet-22k teacher
            "additional_data": bool(r["distill"]),
            "number_forward_passes": 1, "dataset": "cifar10", "venue": None,
            "architecture": f"{r['model_name']} (DeiT-Tiny sizes, patch 4; cdeit-kit)", "eps": None,
            "clean_acc": f"{100 * r['clean_accuracy']:.2f}", "reported": None,
            "corruptions_acc": f"{100 * r['robustbench_accuracy']:.2f}"}
    cs = [c for c in ORDER if c in r["per_corruption"]]
    rows = ["," + ",".join(c for c in cs for _ in range(5)),
            "," + ",".join(str(s) for _ in cs for s in range(1, 6)),
            name + "," + ",".join(f"{a:.4f}" for c in cs for a in r["per_corruption"][c])]
    csv_path = os.path.join(os.path.dirname(path), f"{name}_unaggregated_results.csv")
    return [(path, json.dumps(info, indent=2) + "\n", "RobustBench model info"),
            (csv_path, "\n".join(rows) + "\n", "RobustBench per corruption x severity accuracies")]
