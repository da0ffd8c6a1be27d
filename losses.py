"""The seed's training objectives (Eq. 4-7) in plain PyTorch (torch only).

This is the reference the fused Triton loss (kernels/distill_loss.py) is checked against.

    distill="none"  vit:   CE(cls, y)
    deit  hard  (Eq. 5):   1/2 CE(cls, y) + 1/2 CE(dist, argmax t)
    deit  soft  (Eq. 4):   (1 - a) CE(cls, y) + a tau^2 KL(softmax(t/tau) || softmax(dist/tau))
    cdeit hard  (Eq. 6):   1/3 CE(cls + corr_cls, y) + 1/3 CE(dist, argmax t) + 1/3 CE(corr, type)
    cdeit soft  (Eq. 7):   (1 - a) [CE(cls + corr_cls, y) + CE(corr, type)] / 2 + a tau^2 KL

CE on labels and on corruption types uses label smoothing exactly as
`F.cross_entropy(..., label_smoothing=smoothing)` (also for soft mixup targets); teacher targets
are never smoothed. The KL term is summed over batch and classes and divided by B*C, the
convention of DeiT's reference code (facebookresearch/deit losses.py), not 'batchmean'.
CdeiT strategy 1 has no corr_cls: cls stands alone in the label term.
"""
import torch
import torch.nn.functional as F

DISTILL = ("none", "hard", "soft")


def _check_target(name, target, B, C):
    if target.ndim == 1 and target.shape[0] == B and not target.is_floating_point():
        return
    if target.ndim == 2 and tuple(target.shape) == (B, C) and target.is_floating_point():
        return
    raise ValueError(f"{name} must be class indices ({B},) or soft targets ({B}, {C}); "
                     f"got {target.dtype} {tuple(target.shape)}")


def _ce(logits, target, smoothing):
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def soft_distillation(student, teacher, tau):
    """tau^2 KL(softmax(t/tau) || softmax(s/tau)), summed and divided by B*C (DeiT's convention)."""
    s = F.log_softmax(student.float() / tau, dim=1)
    t = F.log_softmax(teacher.float() / tau, dim=1)
    return F.kl_div(s, t, reduction="sum", log_target=True) * (tau * tau) / student.numel()


def distillation_loss(out, labels, teacher_logits=None, types=None, *, distill,
                      tau=3.0, alpha=0.5, smoothing=0.1):
    """Loss of one batch and its unweighted parts {label, teacher, type} for logging.

    out: the train-mode `Logits(cls, dist, corr, corr_cls)` of model.py.
    labels / types: class indices (B,) or soft targets (B, C) / (B, T).
    teacher_logits: (B, C) teacher logits, required when distill is hard or soft.
    """
    if distill not in DISTILL:
        raise ValueError(f"distill must be one of {DISTILL}, got {distill!r}")
    cls, dist, corr, corr_cls = out
    B, C = cls.shape
    _check_target("labels", labels, B, C)
    if dist is None:  # vit: the baseline has no distillation token
        if distill != "none" or teacher_logits is not None:
            raise ValueError("vit has no distillation token: use distill='none' and no teacher logits")
        loss = _ce(cls, labels, smoothing)
        return loss, {"label": loss.detach()}
    if distill == "none" or teacher_logits is None:
        raise ValueError("deit/cdeit train their distillation token on the teacher: "
                         "use distill='hard' or 'soft' and pass teacher_logits")
    if tuple(teacher_logits.shape) != (B, C):
        raise ValueError(f"teacher_logits must be ({B}, {C}), got {tuple(teacher_logits.shape)}")
    if corr is not None:
        if types is None:
            raise ValueError("cdeit needs the corruption types of the batch (types=...)")
        _check_target("types", types, B, corr.shape[1])

    label_logits = cls if corr_cls is None else cls + corr_cls  # seed Eq. 6-7: CE(Z_s + FFN(Z_c), y)
    label = _ce(label_logits, labels, smoothing)
    if distill == "hard":
        teacher = F.cross_entropy(dist.float(), teacher_logits.argmax(dim=1))  # Eq. 5, no smoothing
    else:
        teacher = soft_distillation(dist, teacher_logits, tau)  # Eq. 4

    parts = {"label": label.detach(), "teacher": teacher.detach()}
    if corr is None:  # deit
        loss = (label + teacher) / 2 if distill == "hard" else (1 - alpha) * label + alpha * teacher
        return loss, parts
    type_ = _ce(corr, types, smoothing)
    parts["type"] = type_.detach()
    if distill == "hard":  # Eq. 6
        loss = (label + teacher + type_) / 3
    else:  # Eq. 7
        loss = (1 - alpha) * (label + type_) / 2 + alpha * teacher
    return loss, parts
