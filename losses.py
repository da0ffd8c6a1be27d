"""The thesis's training objectives (Eq. 4-7): `distillation_loss`, the kit's loss.

The equations are written once, in eager PyTorch, in kernels/reference.py (torch only, so the
kernels/ folder works copied alone); its docstring lists them. The fused Triton loss
(kernels/distill_loss.py) is checked against the same function.
"""
from kernels import reference


def distillation_loss(out, labels, teacher_logits=None, types=None, *, distill,
                      tau=3.0, alpha=0.5, smoothing=0.1):
    """Loss of one batch and its unweighted parts {label, teacher, type} for logging.

    out: the train-mode `Logits(cls, dist, corr, corr_cls)` of model.py.
    labels / types: class indices (B,) or soft targets (B, C) / (B, T).
    teacher_logits: (B, C) teacher logits, required when distill is hard or soft.
    """
    return reference.distillation_loss(out, labels, teacher_logits, types, distill=distill,
                                       tau=tau, alpha=alpha, smoothing=smoothing)
