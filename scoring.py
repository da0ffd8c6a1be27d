"""One evaluation pass over a split, shared by eval.py (its reports) and train.py (validation):

    run_student(net, images, device, batch_size)   every head's logits, the eval-mode output
                                                   and the token cosines, batched on the device
    summarize(outs, split, names)                  every metric of thesis 3.5 from those outputs
    eval_autocast(device), synced_time(device)     the precision and the clock both passes use

metrics.py holds the formulas (torch only); this file ties them to the kit's inputs
(augment.normalize) and image types (data.TYPES, corruptions.SEEN / UNSEEN).
"""
import time

import torch
import torch.nn.functional as F

from augment import normalize
from corruptions import SEEN, UNSEEN
from data import TYPES
from metrics import (
    calibration_bins,
    confusion_matrix,
    corruption_errors,
    ece_from_bins,
    mean_corruption_error,
    mean_or_none,
    nll,
    per_severity_accuracy,
    per_type_accuracy,
    topk_accuracy,
)


def eval_autocast(device):
    """bf16 autocast on CUDA (as in training); fp32 on the CPU, where bf16 matmuls are slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def synced_time(device):
    """time.perf_counter() once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def run_student(net, images, device, batch_size):
    """One forward_tokens pass per batch of uint8 images (N, 3, H, W) gives every head's logits,
    the eval-mode output (VisionTransformer.average_heads, thesis 3.3) and the token cosines
    (thesis 4.4). -> ({name: CPU tensor (N, ...)}, images/s)."""
    net = net.to(device).eval()
    out = {}
    images = images.to(device)  # the whole split on the device once, as uint8 (airbench style)
    t0 = synced_time(device)
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size])
        with eval_autocast(device):
            tok = net.forward_tokens(x)
            logits = net.read_heads(tok)
            heads = {"cls": logits.cls, "combined": net.average_heads(logits)}
            if logits.dist is not None:
                heads["dist"] = logits.dist
            if logits.corr is not None:
                heads["corr"] = logits.corr
            if logits.corr_cls is not None:  # the class-token head as cdeit trains it (Eq. 6)
                heads["cls_corr"] = logits.cls + logits.corr_cls
        for k in [k for k in ("dist", "corr") if k in tok]:
            heads[f"cos_cls_{k}"] = F.cosine_similarity(tok["cls"].float(), tok[k].float(), dim=-1)
        for k, v in heads.items():
            out.setdefault(k, []).append(v.float().cpu())
    ips = len(images) / max(synced_time(device) - t0, 1e-9)
    return {k: torch.cat(v) for k, v in out.items()}, ips


def summarize(outs, split, names=TYPES):
    """Every metric of thesis 3.5 from run_student's (or eval.run_teacher's) outputs and the
    split's bookkeeping (split["types"] indexes names: the mix's 11 types, or clean + the 15
    benchmark corruptions)."""
    logits, y = outs["combined"], split["labels"]
    types, sev = split["types"], split["severities"]
    correct = logits.argmax(-1) == y
    per_type = per_type_accuracy(correct, types, names)
    count, acc, conf = calibration_bins(logits.double().softmax(-1).max(-1).values, correct)
    heads = ("cls", "dist", "cls_corr", "combined")
    r = {"n": len(y), "accuracy": topk_accuracy(logits, y, 1), "top5": topk_accuracy(logits, y, 5),
         "nll": nll(logits, y), "ece": ece_from_bins(count, acc, conf),
         "per_type": per_type, "per_severity": per_severity_accuracy(correct, types, sev),
         "clean_error": None if per_type["clean"] is None else 1.0 - per_type["clean"],
         "seen_corruption_error": mean_corruption_error(per_type, SEEN),
         "unseen_corruption_error": mean_corruption_error(per_type, UNSEEN),  # None on the mix
         "corruption_errors": corruption_errors(correct, types, sev, names),
         # the headline mCE: CIFAR-10-C papers' unnormalised mean corruption error (no baseline)
         "mce": mean_corruption_error(per_type, names[1:]),
         "mce_vs_baseline": None, "relative_mce": None, "relative_mce_undefined": None,
         "robustbench_accuracy": None,
         "head_accuracy": {k: topk_accuracy(outs[k], y, 1) for k in heads if k in outs},
         "corruption_accuracy": None, "confusion_matrix": None,
         "token_similarity": {"cls_dist": None, "cls_corr": None},
         "calibration": {"count": count.tolist(), "accuracy": acc.tolist(),
                         "confidence": conf.tolist()}}
    if "corr" in outs:  # thesis 4.3: how well the corruption token names the image type
        # it names one of the 11 training types; an unseen corruption has no right answer
        true_t = torch.tensor([TYPES.index(n) if n in TYPES else -1 for n in names])[types]
        keep = true_t >= 0
        pred_t = outs["corr"].argmax(-1)[keep]
        r["corruption_accuracy"] = mean_or_none(pred_t == true_t[keep])
        r["confusion_matrix"] = confusion_matrix(pred_t, true_t[keep], len(TYPES)).tolist()
    for k in ("dist", "corr"):  # thesis 4.4: final-layer class token vs the other special tokens
        if f"cos_cls_{k}" in outs:
            r["token_similarity"][f"cls_{k}"] = float(outs[f"cos_cls_{k}"].double().mean())
    return r
