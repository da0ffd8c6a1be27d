"""The student-teacher agreement that eval.py CKPT --teacher HEAD adds (eval.add_agreement) and
tables.print_agreement prints."""
import json

import pytest
import torch

import eval as ev
import tables


def test_teacher_agreement(capsys):
    """eval.add_agreement on hand-made predictions: 6 images, clean (severity 0) and fog
    (data.TYPES[5]) at severity 1 and 2; a checkpoint of another mix is left out."""
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    split = {"labels": y, "types": torch.tensor([0, 0, 0, 5, 5, 5]),
             "severities": torch.tensor([0, 0, 0, 1, 1, 2])}
    args = {"root": "/a", "split": "paper"}
    student = {"checkpoint": "s.pt", "data_args": args, "_pred": torch.tensor([0, 1, 9, 9, 8, 5])}
    teacher = {"checkpoint": "h.pt", "data_args": dict(args, root="/b"),
               "_pred": torch.tensor([0, 7, 9, 3, 7, 5])}
    other = {"checkpoint": "o.pt", "data_args": dict(args, split="grouped"), "_pred": y}
    ev.add_agreement([student, other, teacher], {(json.dumps(args, sort_keys=True), "test"): split},
                     "test")
    rep = student["teacher_agreement"]
    assert "teacher_agreement" not in other
    # image: 0 both right, 1 student only, 2 same error (9), 3 teacher only, 4 different errors,
    # 5 both right
    assert rep["overall"] == {"n": 6, "agreement": 3 / 6, "both_right": 2 / 6,
                              "student_only": 1 / 6, "teacher_only": 1 / 6, "same_error": 1 / 6,
                              "different_errors": 1 / 6}
    assert rep["per_type"]["clean"]["same_error"] == pytest.approx(1 / 3)
    assert rep["per_type"]["fog"]["teacher_only"] == pytest.approx(1 / 3)
    cells = {(c["type"], c["severity"]): c for c in rep["cells"]}
    assert set(cells) == {("clean", 0), ("fog", 1), ("fog", 2)}
    assert cells[("fog", 1)]["n"] == 2 and cells[("fog", 1)]["agreement"] == 0.0
    assert cells[("fog", 2)]["both_right"] == 1.0
    tables.print_agreement(student)
    out = capsys.readouterr().out.splitlines()
    assert "s.pt vs the teacher head h.pt" in out[1] and len(out) == 3 + 1 + 3
