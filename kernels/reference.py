"""The PyTorch versions of the kernels' contracts (torch only): the fallbacks and the references.

    sdpa(q, k, v)            F.scaled_dot_product_attention, (B, H, N, D)
    sdpa_packed(qkv)         qkv (B, N, 3, H, D) from the qkv Linear -> (B, N, H*D) through SDPA
    distillation_loss(...)   the thesis's Eq. 4-7 in eager PyTorch: the kit's losses.py is this

The objectives, for a batch of logits (B, C):
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

kernels/ falls back to these where Triton is missing, a tensor cannot run the kernels or a kernel
failed its self-check, so the folder works when copied into another project on its own.
"""
import torch
import torch.nn.functional as F

DISTILL = ("none", "hard", "soft")


def sdpa(q, k, v):
    """softmax(q k^T / sqrt(D)) v, (B, H, N, D): PyTorch's attention."""
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_packed(qkv):
    """Attention straight from the qkv projection through SDPA: qkv (B, N, 3, H, D) ->
    (B, N, H*D)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("attention_packed wants qkv of shape (B, N, 3, H, D), "
                         f"got {tuple(qkv.shape)}")
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
    return sdpa(q, k, v).transpose(1, 2).reshape(B, N, H * D)


def _check_target(name, target, B, C):
    if target.ndim == 1 and target.shape[0] == B and not target.is_floating_point():
        return
    if target.ndim == 2 and tuple(target.shape) == (B, C) and target.is_floating_point():
        return
    raise ValueError(f"{name} must be class indices ({B},) or soft targets ({B}, {C}); "
                     f"got {target.dtype} {tuple(target.shape)}")


def loss_weights(out, labels, teacher_logits, types, distill, alpha):
    """Validate one call; return the (label, teacher, type) weights of Eq. 4-7."""
    if distill not in DISTILL:
        raise ValueError(f"distill must be one of {DISTILL}, got {distill!r}")
    cls, dist, corr, _ = out
    B, C = cls.shape
    _check_target("labels", labels, B, C)
    if dist is None:
        if distill != "none" or teacher_logits is not None:
            raise ValueError("vit has no distillation token: "
                             "use distill='none' and no teacher logits")
        return 1.0, 0.0, 0.0
    if distill == "none" or teacher_logits is None:
        raise ValueError("deit/cdeit train their distillation token on the teacher: "
                         "use distill='hard' or 'soft' and pass teacher_logits")
    if tuple(teacher_logits.shape) != (B, C):
        raise ValueError(f"teacher_logits must be ({B}, {C}), got {tuple(teacher_logits.shape)}")
    if corr is None:  # deit, Eq. 4-5
        return (0.5, 0.5, 0.0) if distill == "hard" else (1.0 - alpha, alpha, 0.0)
    if types is None:
        raise ValueError("cdeit needs the corruption types of the batch (types=...)")
    _check_target("types", types, B, corr.shape[1])
    if distill == "hard":  # Eq. 6
        return 1 / 3, 1 / 3, 1 / 3
    return (1.0 - alpha) / 2, alpha, (1.0 - alpha) / 2  # Eq. 7


def _wide(x):
    """fp32 for the half types, float64 kept (the self-check's truth); the losses run in fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _ce(logits, target, smoothing):
    return F.cross_entropy(_wide(logits), target, label_smoothing=smoothing)


def distillation_loss(out, labels, teacher_logits=None, types=None, *, distill,
                      tau=3.0, alpha=0.5, smoothing=0.1):
    """(loss, parts) of one batch, parts the unweighted {label, teacher, type} terms, detached.

    out: the train-mode `Logits(cls, dist, corr, corr_cls)` of the kit's model.py.
    labels / types: class indices (B,) or soft targets (B, C) / (B, T).
    teacher_logits: (B, C) teacher logits, required when distill is hard or soft.
    """
    w_label, w_teacher, w_type = loss_weights(out, labels, teacher_logits, types, distill, alpha)
    cls, dist, corr, corr_cls = out
    z = cls if corr_cls is None else cls + corr_cls  # Eq. 6-7: CE(Z_s + FFN(Z_c), y)
    label = _ce(z, labels, smoothing)
    loss, parts = w_label * label, {"label": label.detach()}
    if dist is not None:
        if distill == "hard":  # Eq. 5: the teacher's argmax, never smoothed
            teacher = _ce(dist, teacher_logits.argmax(dim=1), 0.0)
        else:  # Eq. 4: tau^2 KL summed over batch and classes / (B C), DeiT's convention
            s = F.log_softmax(_wide(dist) / tau, dim=1)
            t = F.log_softmax(_wide(teacher_logits) / tau, dim=1)
            teacher = F.kl_div(s, t, reduction="sum", log_target=True) * (tau * tau) / dist.numel()
        loss, parts["teacher"] = loss + w_teacher * teacher, teacher.detach()
    if corr is not None:
        type_ = _ce(corr, types, smoothing)
        loss, parts["type"] = loss + w_type * type_, type_.detach()
    return loss, parts
