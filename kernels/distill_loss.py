"""The seed's distillation objectives (Eq. 4-7) as one fused Triton kernel, forward and gradients.

Standalone: this file imports only torch and triton, so it can be copied into another project.
It carries its own small eager reference (`reference_distillation_loss`), which is the fallback
and which the tests check against the kit's `losses.distillation_loss`.

With label smoothing e, a target distribution q over n classes becomes t = (1 - e) q + e/n (q is
one-hot for class indices, a mixup row otherwise), exactly what F.cross_entropy(label_smoothing=e)
does, and for logits z with lse = logsumexp(z):
    CE(z, t)   = sum(t) lse - sum(t z)            dCE/dz = sum(t) softmax(z) - t
    KL term    = tau^2 sum_b KL(softmax(t/tau) || softmax(s/tau)) / (B C)   (DeiT's normalisation)
                 d/ds = tau (softmax(s/tau) - softmax(t/tau)) / (B C)
The terms of one batch (B, C) and their weights:
    vit   none:  CE(cls, y)
    deit  hard:  1/2 CE(cls, y) + 1/2 CE(dist, argmax t)                        seed Eq. 5
    deit  soft:  (1 - a) CE(cls, y) + a KL                                        seed Eq. 4
    cdeit hard:  1/3 CE(cls + corr_cls, y) + 1/3 CE(dist, argmax t) + 1/3 CE(corr, type)  Eq. 6
    cdeit soft:  (1 - a) [CE(cls + corr_cls, y) + CE(corr, type)] / 2 + a KL               Eq. 7
(strategy 1 has no corr_cls: cls alone in the label term). CE terms are batch means; teacher
targets are never smoothed.

Each program takes a block of rows and in one pass writes d loss / d logits for every logit input
(already weighted) and its block's share of the loss and of the three parts; two small sums
finish the forward. The backward is one multiply by grad_output. The teacher
logits and soft targets get no gradient (the teacher is frozen; targets are data).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

DISTILL = ("none", "hard", "soft")


@triton.jit
def _smoothed_ce(z, target, col_mask, n_cls, smoothing):
    """Rows of CE(z, (1 - e) target + e/n) and its gradient. z: (BLOCK_B, BLOCK_C) fp32 with -inf
    in padded columns; target: fp32, 0 in padded columns."""
    t = tl.where(col_mask, target * (1.0 - smoothing) + smoothing / n_cls, 0.0)
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])  # padded columns -> 0
    s = tl.sum(e, 1)
    tsum = tl.sum(t, 1)
    loss = tsum * (m + tl.log(s)) - tl.sum(t * tl.where(col_mask, z, 0.0), 1)
    grad = e / s[:, None] * tsum[:, None] - t
    return loss, grad


@triton.jit
def _log_softmax(z):
    m = tl.max(z, 1)
    zs = z - m[:, None]
    return zs - tl.log(tl.sum(tl.exp(zs), 1))[:, None]


@triton.jit
def _distill_loss_kernel(
    CLS, CORR_CLS, DIST, TEACHER,   # (B, C) logits, any float dtype, unit column stride
    CORR,                           # (B, T) corruption-token logits
    LABELS, TYPES,                  # (B,) int64 indices, or (B, C) / (B, T) float soft targets
    G_LABEL, G_DIST, G_CORR,        # (B, C), (B, C), (B, T) weighted gradients, contiguous
    PARTIAL,                        # (programs, 4) fp32: this block's [loss, label, teacher, type]
    stride_cls, stride_cc, stride_dist, stride_t, stride_corr, stride_lab, stride_typ,
    B, C, T, smoothing, inv_tau, kl_scale, w_label, w_teacher, w_type,
    HAS_CORR_CLS: tl.constexpr, TEACHER_MODE: tl.constexpr,  # 0 none, 1 hard (Eq. 5/6), 2 soft (Eq. 4/7)
    HAS_CORR: tl.constexpr, SOFT_LABELS: tl.constexpr, SOFT_TYPES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    tcols = tl.arange(0, BLOCK_T)
    tmask = tcols < T
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    m2 = rmask[:, None] & cmask[None, :]
    teacher_rows = tl.zeros((BLOCK_B,), dtype=tl.float32)
    type_rows = tl.zeros((BLOCK_B,), dtype=tl.float32)
    # Rows past B load zeros (finite); their losses are masked out of the sums below.
    z = tl.load(CLS + rows[:, None] * stride_cls + cols[None, :], mask=m2, other=0.0)
    if HAS_CORR_CLS:  # seed Eq. 6-7: the label term sees cls + FFN(corr), rounded to the
        # logits' dtype like the eager `cls + corr_cls` (PyTorch also adds in fp32 and rounds)
        zc = tl.load(CORR_CLS + rows[:, None] * stride_cc + cols[None, :], mask=m2, other=0.0)
        z = (z.to(tl.float32) + zc.to(tl.float32)).to(CLS.dtype.element_ty)
    z = tl.where(cmask[None, :], z.to(tl.float32), float("-inf"))
    if SOFT_LABELS:
        y = tl.load(LABELS + rows[:, None] * stride_lab + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        lab = tl.load(LABELS + rows * stride_lab, mask=rmask, other=0)
        y = (cols[None, :] == lab[:, None]).to(tl.float32)
    loss, g = _smoothed_ce(z, y, cmask[None, :], C, smoothing)
    label_rows = tl.where(rmask, loss, 0.0)
    tl.store(G_LABEL + rows[:, None] * C + cols[None, :], g * (w_label / B), mask=m2)

    if TEACHER_MODE != 0:
        d = tl.load(DIST + rows[:, None] * stride_dist + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        d = tl.where(cmask[None, :], d, float("-inf"))
        t = tl.load(TEACHER + rows[:, None] * stride_t + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        t = tl.where(cmask[None, :], t, float("-inf"))
        if TEACHER_MODE == 1:  # hard: CE(dist, argmax teacher), no smoothing (Eq. 5)
            a = tl.argmax(t, 1, tie_break_left=True)  # first maximum, like torch.argmax
            loss, g = _smoothed_ce(d, (cols[None, :] == a[:, None]).to(tl.float32), cmask[None, :], C, 0.0)
            teacher_rows = tl.where(rmask, loss, 0.0)
            g = g * (w_teacher / B)
        else:  # soft: tau^2 KL / (B C) (Eq. 4); kl_scale = tau^2 / (B C)
            log_ps = _log_softmax(d * inv_tau)
            log_pt = _log_softmax(t * inv_tau)
            pt = tl.exp(log_pt)  # 0 in padded columns, where both logs are -inf (no -inf - -inf)
            kl = tl.sum(pt * (tl.where(cmask[None, :], log_pt, 0.0) - tl.where(cmask[None, :], log_ps, 0.0)), 1)
            teacher_rows = tl.where(rmask, kl, 0.0)
            g = (tl.exp(log_ps) - pt) * (inv_tau * kl_scale * w_teacher)
        tl.store(G_DIST + rows[:, None] * C + cols[None, :], g, mask=m2)

    if HAS_CORR:  # CE(corr, type) with smoothing (Eq. 6-7)
        m3 = rmask[:, None] & tmask[None, :]
        zc = tl.load(CORR + rows[:, None] * stride_corr + tcols[None, :], mask=m3, other=0.0).to(tl.float32)
        zc = tl.where(tmask[None, :], zc, float("-inf"))
        if SOFT_TYPES:
            yc = tl.load(TYPES + rows[:, None] * stride_typ + tcols[None, :], mask=m3, other=0.0).to(tl.float32)
        else:
            typ = tl.load(TYPES + rows * stride_typ, mask=rmask, other=0)
            yc = (tcols[None, :] == typ[:, None]).to(tl.float32)
        loss, g = _smoothed_ce(zc, yc, tmask[None, :], T, smoothing)
        type_rows = tl.where(rmask, loss, 0.0)
        tl.store(G_CORR + rows[:, None] * T + tcols[None, :], g * (w_type / B), mask=m3)

    # This block's share of the terms (each already normalised) and of the weighted loss.
    label = tl.sum(label_rows, 0) / B
    if TEACHER_MODE == 2:
        teacher = tl.sum(teacher_rows, 0) * kl_scale
    else:
        teacher = tl.sum(teacher_rows, 0) / B
    type_ = tl.sum(type_rows, 0) / B
    tl.store(PARTIAL + pid * 4 + 0, w_label * label + w_teacher * teacher + w_type * type_)
    tl.store(PARTIAL + pid * 4 + 1, label)
    tl.store(PARTIAL + pid * 4 + 2, teacher)
    tl.store(PARTIAL + pid * 4 + 3, type_)


# ----------------------------------------------------------------------------------------------
# Checks and weights, shared by the kernel path and the eager reference (same errors as losses.py).

def _check_target(name, target, B, C):
    if target.ndim == 1 and target.shape[0] == B and not target.is_floating_point():
        return
    if target.ndim == 2 and tuple(target.shape) == (B, C) and target.is_floating_point():
        return
    raise ValueError(f"{name} must be class indices ({B},) or soft targets ({B}, {C}); "
                     f"got {target.dtype} {tuple(target.shape)}")


def _weights(out, labels, teacher_logits, types, distill, alpha):
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


def reference_distillation_loss(out, labels, teacher_logits=None, types=None, *, distill,
                                tau=3.0, alpha=0.5, smoothing=0.1):
    """Eager PyTorch version of the same objective (the fallback)."""
    w_label, w_teacher, w_type = _weights(out, labels, teacher_logits, types, distill, alpha)
    cls, dist, corr, corr_cls = out
    z = cls if corr_cls is None else cls + corr_cls
    label = F.cross_entropy(z.float(), labels, label_smoothing=smoothing)
    loss, parts = w_label * label, {"label": label.detach()}
    if dist is not None:
        if distill == "hard":
            teacher = F.cross_entropy(dist.float(), teacher_logits.argmax(dim=1))
        else:
            s = F.log_softmax(dist.float() / tau, dim=1)
            t = F.log_softmax(teacher_logits.float() / tau, dim=1)
            teacher = F.kl_div(s, t, reduction="sum", log_target=True) * (tau * tau) / dist.numel()
        loss, parts["teacher"] = loss + w_teacher * teacher, teacher.detach()
    if corr is not None:
        type_ = F.cross_entropy(corr.float(), types, label_smoothing=smoothing)
        loss, parts["type"] = loss + w_type * type_, type_.detach()
    return loss, parts


# ----------------------------------------------------------------------------------------------
# The custom op: (loss, parts, grads); grads is one flat buffer [label | dist | corr] in the logits'
# dtype, so the backward is a single multiply.

def _rows(x):  # unit column stride, any row stride
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_rows(C, T):
    # 32 rows x 16 columns: ~4 fp32 values a thread per tile at 4 warps, no register spills
    # (ptxas, sm_90); 32 programs at B=1024. Wider heads get fewer rows.
    return max(1, min(32, 512 // max(triton.next_power_of_2(C), triton.next_power_of_2(T))))


@torch.library.custom_op("triton_kit::distill_loss_fwd", mutates_args=())
def _distill_loss_fwd(cls: torch.Tensor, corr_cls: torch.Tensor | None, dist: torch.Tensor | None,
                      teacher: torch.Tensor | None, corr: torch.Tensor | None, labels: torch.Tensor,
                      types: torch.Tensor | None, teacher_mode: int, tau: float, smoothing: float,
                      w_label: float, w_teacher: float, w_type: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C = cls.shape
    T = corr.shape[1] if corr is not None else 1
    n_dist = B * C if teacher_mode else 0
    grads = cls.new_empty(B * C + n_dist + (B * T if corr is not None else 0),
                          dtype=_grad_dtype(cls, corr_cls, dist, corr))
    g_label, g_dist, g_corr = grads[:B * C], grads[B * C:B * C + n_dist], grads[B * C + n_dist:]
    cls = _rows(cls)
    corr_cls = _rows(corr_cls) if corr_cls is not None else cls
    dist = _rows(dist) if teacher_mode else cls
    teacher = _rows(teacher) if teacher_mode else cls
    corr_ = _rows(corr) if corr is not None else cls
    labels = _rows(labels) if labels.dim() == 2 else labels
    types_ = (_rows(types) if types.dim() == 2 else types) if types is not None else labels
    BLOCK_B = _block_rows(C, T)
    grid = (triton.cdiv(B, BLOCK_B),)
    partial = cls.new_empty((grid[0], 4), dtype=torch.float32)
    _distill_loss_kernel[grid](
        cls, corr_cls, dist, teacher, corr_, labels, types_, g_label, g_dist, g_corr, partial,
        cls.stride(0), corr_cls.stride(0), dist.stride(0), teacher.stride(0), corr_.stride(0),
        labels.stride(0), types_.stride(0),
        B, C, T, float(smoothing), 1.0 / tau, tau * tau / (B * C), float(w_label), float(w_teacher),
        float(w_type),
        HAS_CORR_CLS=corr_cls is not cls, TEACHER_MODE=teacher_mode, HAS_CORR=corr is not None,
        SOFT_LABELS=labels.is_floating_point(), SOFT_TYPES=types_.is_floating_point(),
        BLOCK_B=BLOCK_B, BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_T=max(16, triton.next_power_of_2(T)), num_warps=4)
    return partial[:, 0].sum(), partial[:, 1:].sum(0), grads


def _grad_dtype(*logits):
    dtypes = {x.dtype for x in logits if x is not None}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


@_distill_loss_fwd.register_fake
def _(cls, corr_cls, dist, teacher, corr, labels, types, teacher_mode, tau, smoothing,
      w_label, w_teacher, w_type):
    B, C = cls.shape
    n = B * C * (2 if teacher_mode else 1) + (corr.numel() if corr is not None else 0)
    f32 = torch.float32
    return (cls.new_empty((), dtype=f32), cls.new_empty(3, dtype=f32),
            cls.new_empty(n, dtype=_grad_dtype(cls, corr_cls, dist, corr)))


def _distill_setup(ctx, inputs, output):
    cls, corr_cls, dist, _, corr = inputs[:5]
    ctx.meta = [(x.shape, x.dtype) if x is not None else None for x in (cls, corr_cls, dist, corr)]
    ctx.save_for_backward(output[2])
    ctx.set_materialize_grads(False)  # parts and grads get no gradient: no zero tensors for them


def _distill_backward(ctx, g_loss, g_parts, g_grads):  # parts and grads are not differentiated
    if g_loss is None:
        return (None,) * 13
    (grads,) = ctx.saved_tensors
    (cls_shape, cls_dtype), cc, dist, corr = ctx.meta
    B, C = cls_shape
    scaled = grads * g_loss  # the whole backward: one multiply (the .to()s below are no-ops
    g_label = scaled[:B * C].view(B, C)  # unless the logits differ in dtype)
    g_cls = g_label.to(cls_dtype)
    g_cc = g_label.to(cc[1]) if cc is not None else None
    g_dist = scaled[B * C:2 * B * C].view(B, C).to(dist[1]) if dist is not None else None
    g_corr = scaled[-corr[0].numel():].view(corr[0]).to(corr[1]) if corr is not None else None
    return g_cls, g_cc, g_dist, None, g_corr, None, None, None, None, None, None, None, None


_distill_loss_fwd.register_autograd(_distill_backward, setup_context=_distill_setup)


# ----------------------------------------------------------------------------------------------
# Public API.

INTERPRETED = type(_distill_loss_kernel).__name__ == "InterpretedFunction"


def use_triton(t):
    """CUDA tensors run the kernel; CPU tensors only under the Triton interpreter, and not bf16
    there (triton 3.8's interpreter rounds fp32 -> bf16 by truncation)."""
    return t.is_cuda or (INTERPRETED and t.device.type == "cpu" and t.dtype != torch.bfloat16)


def distillation_loss(out, labels, teacher_logits=None, types=None, *, distill,
                      tau=3.0, alpha=0.5, smoothing=0.1):
    """Same contract as losses.distillation_loss: returns (loss, parts) with parts the unweighted
    {label, teacher, type} terms (those the model has), detached."""
    w_label, w_teacher, w_type = _weights(out, labels, teacher_logits, types, distill, alpha)
    cls, dist, corr, corr_cls = out
    if not use_triton(cls) or cls.numel() == 0:
        return reference_distillation_loss(out, labels, teacher_logits, types, distill=distill,
                                           tau=tau, alpha=alpha, smoothing=smoothing)
    teacher_mode = 0 if dist is None else (1 if distill == "hard" else 2)
    loss, parts, _ = _distill_loss_fwd(cls, corr_cls, dist, teacher_logits if teacher_mode else None,
                                       corr, labels, types if corr is not None else None,
                                       teacher_mode, float(tau), float(smoothing),
                                       w_label, w_teacher, w_type)
    parts = parts.detach()
    names = ["label"] + (["teacher"] if dist is not None else []) + (["type"] if corr is not None else [])
    return loss, {name: parts[i] for i, name in enumerate(("label", "teacher", "type")) if name in names}
