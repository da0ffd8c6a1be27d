"""The seed's distillation objectives (Eq. 4-7) as one fused Triton kernel, forward and gradients.

Imports torch, triton and kernels/reference.py, whose eager version of the same objective
(`reference_distillation_loss` here) is the fallback; the tests check both against the kit's
`losses.distillation_loss`.

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

One program walks all rows in blocks and in the same pass writes d loss / d logits for every
logit input (already weighted, fp32) and the loss and its three parts. The backward is one
multiply by grad_output, in fp32, then a cast to each logit's dtype. The teacher logits and soft
targets get no gradient (the teacher is frozen; targets are data).
"""
import torch
import triton
import triton.language as tl

from .reference import distillation_loss as reference_distillation_loss, loss_weights


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
    G_LABEL, G_DIST, G_CORR,        # (B, C), (B, C), (B, T) fp32 weighted gradients, contiguous
    STATS,                          # (4,) fp32: [loss, label, teacher, type]
    stride_cls, stride_cc, stride_dist, stride_t, stride_corr, stride_lab, stride_typ,
    B, C, T, smoothing, inv_tau, kl_scale, w_label, w_teacher, w_type,
    HAS_CORR_CLS: tl.constexpr, TEACHER_MODE: tl.constexpr,  # 0 none, 1 hard (Eq. 5/6), 2 soft (Eq. 4/7)
    HAS_CORR: tl.constexpr, SOFT_LABELS: tl.constexpr, SOFT_TYPES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program walks every row: at B ~ 1024 x 10 classes the launch, not the bytes, is the cost,
    # and one program finishes the sums itself (no partial sums, no second reduction).
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    tcols = tl.arange(0, BLOCK_T)
    tmask = tcols < T
    label_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    teacher_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    type_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B).to(tl.int64)
        rmask = rows < B
        m2 = rmask[:, None] & cmask[None, :]
        # Rows past B load zeros (finite); their losses are masked out of the sums.
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
        label_acc += tl.where(rmask, loss, 0.0)
        tl.store(G_LABEL + rows[:, None] * C + cols[None, :], g * (w_label / B), mask=m2)

        if TEACHER_MODE != 0:
            d = tl.load(DIST + rows[:, None] * stride_dist + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            d = tl.where(cmask[None, :], d, float("-inf"))
            t = tl.load(TEACHER + rows[:, None] * stride_t + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            t = tl.where(cmask[None, :], t, float("-inf"))
            if TEACHER_MODE == 1:  # hard: CE(dist, argmax teacher), no smoothing (Eq. 5)
                a = tl.argmax(t, 1, tie_break_left=True)  # first maximum, like torch.argmax
                loss, g = _smoothed_ce(d, (cols[None, :] == a[:, None]).to(tl.float32), cmask[None, :], C, 0.0)
                teacher_acc += tl.where(rmask, loss, 0.0)
                g = g * (w_teacher / B)
            else:  # soft: tau^2 KL / (B C) (Eq. 4); kl_scale = tau^2 / (B C)
                log_ps = _log_softmax(d * inv_tau)
                log_pt = _log_softmax(t * inv_tau)
                pt = tl.exp(log_pt)  # 0 in padded columns, where both logs are -inf (no -inf - -inf)
                kl = tl.sum(pt * (tl.where(cmask[None, :], log_pt, 0.0) - tl.where(cmask[None, :], log_ps, 0.0)), 1)
                teacher_acc += tl.where(rmask, kl, 0.0)
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
            type_acc += tl.where(rmask, loss, 0.0)
            tl.store(G_CORR + rows[:, None] * T + tcols[None, :], g * (w_type / B), mask=m3)

    # The terms (each normalised as in losses.py) and the weighted loss.
    label = tl.sum(label_acc, 0) / B
    if TEACHER_MODE == 2:
        teacher = tl.sum(teacher_acc, 0) * kl_scale
    else:
        teacher = tl.sum(teacher_acc, 0) / B
    type_ = tl.sum(type_acc, 0) / B
    tl.store(STATS + 0, w_label * label + w_teacher * teacher + w_type * type_)
    tl.store(STATS + 1, label)
    tl.store(STATS + 2, teacher)
    tl.store(STATS + 3, type_)


# ----------------------------------------------------------------------------------------------
# The custom op: (stats, grads). stats = [loss, label, teacher, type]; grads is one flat fp32
# buffer [label | dist | corr] of d loss / d logits. It stays fp32 until the backward has applied
# grad_output (under fp16 GradScaler, the loss scale): many entries are ~1e-6 / B, below fp16's
# normal range, and would round to subnormals or zero if stored in fp16 before scaling.

def _rows(x):  # unit column stride, any row stride
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_rows(C, T):
    # 32 rows x 16 columns a step: ~4 fp32 values a thread per tile at 4 warps, no register spills
    # (ptxas, sm_90). Wider heads get fewer rows.
    return max(1, min(32, 512 // max(triton.next_power_of_2(C), triton.next_power_of_2(T))))


@torch.library.custom_op("triton_kit::distill_loss_fwd", mutates_args=())
def _distill_loss_fwd(cls: torch.Tensor, corr_cls: torch.Tensor | None, dist: torch.Tensor | None,
                      teacher: torch.Tensor | None, corr: torch.Tensor | None, labels: torch.Tensor,
                      types: torch.Tensor | None, teacher_mode: int, tau: float, smoothing: float,
                      w_label: float, w_teacher: float, w_type: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    B, C = cls.shape
    T = corr.shape[1] if corr is not None else 1
    n_dist = B * C if teacher_mode else 0
    grads = cls.new_empty(B * C + n_dist + (B * T if corr is not None else 0), dtype=torch.float32)
    g_label, g_dist, g_corr = grads[:B * C], grads[B * C:B * C + n_dist], grads[B * C + n_dist:]
    cls = _rows(cls)
    corr_cls = _rows(corr_cls) if corr_cls is not None else cls
    dist = _rows(dist) if teacher_mode else cls
    teacher = _rows(teacher) if teacher_mode else cls
    corr_ = _rows(corr) if corr is not None else cls
    labels = _rows(labels) if labels.dim() == 2 else labels
    types_ = (_rows(types) if types.dim() == 2 else types) if types is not None else labels
    stats = cls.new_empty(4, dtype=torch.float32)
    _distill_loss_kernel[(1,)](
        cls, corr_cls, dist, teacher, corr_, labels, types_, g_label, g_dist, g_corr, stats,
        cls.stride(0), corr_cls.stride(0), dist.stride(0), teacher.stride(0), corr_.stride(0),
        labels.stride(0), types_.stride(0),
        B, C, T, float(smoothing), 1.0 / tau, tau * tau / (B * C), float(w_label), float(w_teacher),
        float(w_type),
        HAS_CORR_CLS=corr_cls is not cls, TEACHER_MODE=teacher_mode, HAS_CORR=corr is not None,
        SOFT_LABELS=labels.is_floating_point(), SOFT_TYPES=types_.is_floating_point(),
        BLOCK_B=_block_rows(C, T), BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_T=max(16, triton.next_power_of_2(T)), num_warps=4)
    return stats, grads


@_distill_loss_fwd.register_fake
def _(cls, corr_cls, dist, teacher, corr, labels, types, teacher_mode, tau, smoothing,
      w_label, w_teacher, w_type):
    B, C = cls.shape
    n = B * C * (2 if teacher_mode else 1) + (corr.numel() if corr is not None else 0)
    return cls.new_empty(4, dtype=torch.float32), cls.new_empty(n, dtype=torch.float32)


def _distill_setup(ctx, inputs, output):
    cls, corr_cls, dist, _, corr = inputs[:5]
    ctx.meta = [(x.shape, x.dtype) if x is not None else None for x in (cls, corr_cls, dist, corr)]
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)  # grads gets no gradient: no zero tensor for it


def _distill_backward(ctx, g_stats, g_grads):  # only stats[0], the loss, is differentiated
    if g_stats is None:
        return (None,) * 13
    (grads,) = ctx.saved_tensors
    (cls_shape, cls_dtype), cc, dist, corr = ctx.meta
    B, C = cls_shape
    dtypes = {m[1] for m in ctx.meta if m is not None}
    scaled = grads * g_stats[0]  # the whole backward: one fp32 multiply, then the logits' dtype
    scaled = scaled.to(dtypes.pop()) if len(dtypes) == 1 else scaled  # one cast, not one per input
    g_label = scaled[:B * C].view(B, C)
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
    w_label, w_teacher, w_type = loss_weights(out, labels, teacher_logits, types, distill, alpha)
    cls, dist, corr, corr_cls = out
    if not use_triton(cls) or cls.numel() == 0:
        return reference_distillation_loss(out, labels, teacher_logits, types, distill=distill,
                                           tau=tau, alpha=alpha, smoothing=smoothing)
    teacher_mode = 0 if dist is None else (1 if distill == "hard" else 2)
    stats, _ = _distill_loss_fwd(cls, corr_cls, dist, teacher_logits if teacher_mode else None,
                                 corr, labels, types if corr is not None else None,
                                 teacher_mode, float(tau), float(smoothing), w_label, w_teacher, w_type)
    parts = stats.detach()
    names = ["label"] + (["teacher"] if dist is not None else []) + (["type"] if corr is not None else [])
    return stats[0], {name: parts[1 + i] for i, name in enumerate(("label", "teacher", "type")) if name in names}
