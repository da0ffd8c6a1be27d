"""scoring.py: run_student's heads and averaged output against the model's own eval forward for
every model and strategy, and summarize on a hand-made split."""
import pytest
import torch

import augment
import data
import scoring
from model import create_model


@pytest.mark.parametrize("name,strategy", [("vit", 2), ("deit", 2), ("cdeit", 1), ("cdeit", 2),
                                           ("cdeit", 3)])
def test_run_student_heads_and_average_match_the_eval_forward(name, strategy):
    """run_student's averaged output is the model's own eval forward (thesis 3.3), each head is
    the head's Linear on its token, and the token cosines are those of forward_tokens."""
    torch.manual_seed(0)
    kw = {"strategy": strategy} if name == "cdeit" else {}
    net = create_model(name, depth=1, embed_dim=32, num_heads=2, **kw).eval()
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    outs, ips = scoring.run_student(net, images, torch.device("cpu"), batch_size=3)  # 3 batches
    x = augment.normalize(images)
    with torch.no_grad():
        tok, want = net.forward_tokens(x), net(x)
    assert ips > 0
    torch.testing.assert_close(outs["combined"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["cls"], net.head(tok["cls"]).detach(), rtol=1e-5, atol=1e-5)
    heads = {"vit": {"cls", "combined"}, "deit": {"cls", "dist", "combined", "cos_cls_dist"}}
    cdeit = heads["deit"] | {"corr", "cos_cls_corr"} | ({"cls_corr"} if strategy != 1 else set())
    assert set(outs) == heads.get(name, cdeit)
    for k in [k for k in ("dist", "corr") if k in tok]:
        cos = torch.nn.functional.cosine_similarity(tok["cls"], tok[k], dim=-1)
        torch.testing.assert_close(outs[f"cos_cls_{k}"], cos, rtol=1e-5, atol=1e-5)
    if "cls_corr" in outs:  # the class-token head as cdeit trains it (thesis Eq. 6)
        with torch.no_grad():
            cls_corr = net.head(tok["cls"]) + net.corr_proj(net.head_corr(tok["corr"]))
        torch.testing.assert_close(outs["cls_corr"], cls_corr, rtol=1e-5, atol=1e-5)


def test_summarize_hand_example():
    """Four images of the mix: two clean, two brightness at severities 1 and 3; the averaged
    output is right on images 0 and 2, the class head only on 0, the corruption token names the
    type of images 0, 1 and 3."""
    combined = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])
    cls = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0], [5.0, 0.0]])
    corr = torch.full((4, len(data.TYPES)), -9.0)
    corr[[0, 1, 2, 3], [0, 0, 0, 1]] = 9.0  # predicted types: clean, clean, clean, brightness
    outs = {"combined": combined, "cls": cls, "corr": corr,
            "cos_cls_dist": torch.tensor([1.0, 0.5, 0.0, -0.5])}
    split = {"labels": torch.tensor([0, 0, 0, 1]), "types": torch.tensor([0, 0, 1, 1]),
             "severities": torch.tensor([0, 0, 1, 3])}
    r = scoring.summarize(outs, split)
    assert r["n"] == 4 and r["accuracy"] == 0.5 and r["top5"] == 1.0
    assert r["head_accuracy"] == {"cls": 0.25, "combined": 0.5}
    assert r["per_type"]["clean"] == 0.5 and r["per_type"]["brightness"] == 0.5
    assert r["clean_error"] == 0.5 and r["per_severity"] == {"1": 1.0, "2": None, "3": 0.0,
                                                              "4": None, "5": None}
    assert r["mce"] == 0.5 and "mean_corruption_error" not in r  # brightness, the one type present
    assert r["seen_corruption_error"] == 0.5 and r["unseen_corruption_error"] is None
    assert r["corruption_accuracy"] == 0.75
    assert r["confusion_matrix"][0][:2] == [2, 0] and r["confusion_matrix"][1][:2] == [1, 1]
    assert r["token_similarity"] == {"cls_dist": 0.25, "cls_corr": None}
    assert sum(r["calibration"]["count"]) == 4
