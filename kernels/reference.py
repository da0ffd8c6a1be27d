"""The PyTorch versions of the kernels' contracts (torch only): the fallbacks and the references.

    sdpa(q, k, v)              F.scaled_dot_product_attention, (B, H, N, D)
    sdpa_packed(qkv)           qkv (B, N, 3, H, D) from the qkv Linear -> (B, N, H*D) through SDPA
    distillation_loss(...)     the seed's Eq. 4-7 in eager PyTorch, same contract as losses.py's

kernels/ falls back to these where Triton is missing or a tensor cannot run the kernels, so the
folder works when copied into another project without the kit's losses.py.
"""
import torch.nn.functional as F

DISTILL = ("none", "hard", "soft")


def sdpa(q, k, v):
    """softmax(q k^T / sqrt(D)) v, (B, H, N, D): PyTorch's attention."""
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_packed(qkv):
    """Attention straight from the qkv projection through SDPA: qkv (B, N, 3, H, D) -> (B, N, H*D)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention_packed wants qkv of shape (B, N, 3, H, D), got {tuple(qkv.shape)}")
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
    """Validate one call; return the (label, teacher, type) weights of the seed's Eq. 4-7."""
    if distill not in DISTILL:
        raise ValueError(f"distill must be one of {DISTILL}, got {distill!r}")
    cls, dist, corr, corr_cls = out
    B, C = cls.shape
    _check_target("labels", labels, B, C)
    if dist is None:
        if distill != "none" or teacher_logits is not None:
            raise ValueError("vit has no distillation token: use distill='none' and no teacher logits")
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
    return (1 / 3, 1 / 3, 1 / 3) if distill == "hard" else ((1.0 - alpha) / 2, alpha, (1.0 - alpha) / 2)


def distillation_loss(out, labels, teacher_logits=None, types=None, *, distill,
                      tau=3.0, alpha=0.5, smoothing=0.1):
    """(loss, parts) of one batch, parts the unweighted {label, teacher, type} terms, detached."""
    w_label, w_teacher, w_type = loss_weights(out, labels, teacher_logits, types, distill, alpha)
    cls, dist, corr, corr_cls = out
    z = cls if corr_cls is None else cls + corr_cls  # seed Eq. 6-7: CE(Z_s + FFN(Z_c), y)
    label = F.cross_entropy(z.float(), labels, label_smoothing=smoothing)
    loss, parts = w_label * label, {"label": label.detach()}
    if dist is not None:
        if distill == "hard":  # Eq. 5: the teacher's argmax, never smoothed
            teacher = F.cross_entropy(dist.float(), teacher_logits.argmax(dim=1))
        else:  # Eq. 4: tau^2 KL summed over batch and classes / (B C), DeiT's convention
            s = F.log_softmax(dist.float() / tau, dim=1)
            t = F.log_softmax(teacher_logits.float() / tau, dim=1)
            teacher = F.kl_div(s, t, reduction="sum", log_target=True) * (tau * tau) / dist.numel()
        loss, parts["teacher"] = loss + w_teacher * teacher, teacher.detach()
    if corr is not None:
        type_ = F.cross_entropy(corr.float(), types, label_smoothing=smoothing)
        loss, parts["type"] = loss + w_type * type_, type_.detach()
    return loss, parts
