"""losses.distillation_loss against sums written out by hand (thesis Eq. 4-7)."""
import zlib

import pytest
import torch

from losses import distillation_loss
from model import Logits, create_model

B, C, T = 5, 10, 11
EPS = 0.1


def _log_softmax(z):
    z = z.double()
    return z - torch.log(torch.exp(z - z.max(1, keepdim=True).values).sum(1, keepdim=True)) \
        - z.max(1, keepdim=True).values


def _ce(z, target, eps):
    """Smoothed cross entropy written out: target q -> (1-eps) q + eps/K, then -sum q log p."""
    logp = _log_softmax(z)
    K = z.shape[1]
    q = torch.nn.functional.one_hot(target, K).double() if target.ndim == 1 else target.double()
    q = (1 - eps) * q + eps / K
    return -(q * logp).sum(1).mean().item()


def _kl(student, teacher, tau):
    """tau^2 * sum_{b,c} p_t (log p_t - log p_s) / (B*C), DeiT's normalisation."""
    ls, lt = _log_softmax(student / tau), _log_softmax(teacher / tau)
    return (tau * tau * (lt.exp() * (lt - ls)).sum() / student.numel()).item()


def _inputs(seed, soft):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 2
    out = Logits(r(B, C), r(B, C), r(B, T), r(B, C))
    if soft:  # mixup-style soft targets
        labels = torch.softmax(r(B, C), 1)
        types = torch.softmax(r(B, T), 1)
    else:
        labels = torch.randint(0, C, (B,), generator=g)
        types = torch.randint(0, T, (B,), generator=g)
    return out, labels, r(B, C), types


@pytest.mark.parametrize("soft_targets", [False, True])
@pytest.mark.parametrize("case", ["vit", "deit-hard", "deit-soft", "cdeit1-hard", "cdeit1-soft",
                                  "cdeit2-hard", "cdeit2-soft"])
def test_loss_values(case, soft_targets):
    out, y, t, types = _inputs(zlib.crc32(case.encode()) % 1000, soft_targets)
    tau, a = 3.0, 0.3
    hard_t = t.argmax(1)
    if case == "vit":
        o = Logits(out.cls)
        loss, parts = distillation_loss(o, y, distill="none", smoothing=EPS)
        expect = _ce(out.cls, y, EPS)
    elif case.startswith("deit"):
        o = Logits(out.cls, out.dist)
        distill = case.split("-")[1]
        loss, parts = distillation_loss(o, y, t, distill=distill, tau=tau, alpha=a, smoothing=EPS)
        if distill == "hard":  # Eq. 5: teacher targets are not smoothed
            expect = 0.5 * _ce(out.cls, y, EPS) + 0.5 * _ce(out.dist, hard_t, 0.0)
        else:  # Eq. 4
            expect = (1 - a) * _ce(out.cls, y, EPS) + a * _kl(out.dist, t, tau)
    else:
        strategy, distill = int(case[5]), case.split("-")[1]
        o = out if strategy == 2 else out._replace(corr_cls=None)
        label_logits = out.cls + out.corr_cls if strategy == 2 else out.cls
        loss, parts = distillation_loss(o, y, t, types, distill=distill, tau=tau, alpha=a,
                                        smoothing=EPS)
        if distill == "hard":  # Eq. 6
            expect = (_ce(label_logits, y, EPS) + _ce(out.dist, hard_t, 0.0)
                      + _ce(out.corr, types, EPS)) / 3
        else:  # Eq. 7
            expect = (1 - a) * (_ce(label_logits, y, EPS) + _ce(out.corr, types, EPS)) / 2 \
                + a * _kl(out.dist, t, tau)
        assert parts["type"].item() == pytest.approx(_ce(out.corr, types, EPS), rel=1e-5)
    assert loss.item() == pytest.approx(expect, rel=1e-5, abs=1e-6)
    assert parts["label"].item() > 0


def test_kl_normalisation_is_per_element():
    """DeiT divides the summed KL by B*C, so doubling the classes with copies halves nothing
    else."""
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    out = Logits(torch.zeros(4, 10), s)
    y = torch.zeros(4, dtype=torch.long)
    _, parts = distillation_loss(out, y, t, distill="soft", tau=1.0, smoothing=0.0)
    p_t = torch.softmax(t, 1)
    manual = (p_t * (torch.log_softmax(t, 1) - torch.log_softmax(s, 1))).sum() / 40
    assert parts["teacher"].item() == pytest.approx(manual.item(), rel=1e-5)


@pytest.mark.parametrize("distill", ["hard", "soft"])
def test_gradients_reach_the_right_heads(distill):
    """Each head's gradient equals the gradient of exactly the terms that should reach it."""
    torch.manual_seed(0)
    m = create_model("cdeit", depth=1, embed_dim=24, num_heads=2, strategy=2).train()
    x = torch.randn(6, 3, 32, 32)
    y, types, t = torch.randint(0, 10, (6,)), torch.randint(0, 11, (6,)), torch.randn(6, 10)
    heads = {"head": m.head, "head_dist": m.head_dist, "head_corr": m.head_corr,
             "corr_proj": m.corr_proj}

    def grads(loss):
        g = torch.autograd.grad(loss, [h.weight for h in heads.values()], allow_unused=True,
                                retain_graph=True)
        return {n: (torch.zeros_like(h.weight) if gi is None else gi)
                for (n, h), gi in zip(heads.items(), g, strict=True)}

    out = m(x)
    total = grads(distillation_loss(out, y, t, types, distill=distill)[0])
    ce = torch.nn.functional.cross_entropy
    w_label, w_type = (1 / 3, 1 / 3) if distill == "hard" else (0.25, 0.25)
    label_term = grads(w_label * ce(out.cls + out.corr_cls, y, label_smoothing=0.1))
    type_term = grads(w_type * ce(out.corr, types, label_smoothing=0.1))
    assert torch.allclose(total["corr_proj"], label_term["corr_proj"], atol=1e-7)  # label term only
    assert torch.allclose(total["head"], label_term["head"], atol=1e-7)
    assert torch.allclose(total["head_corr"], label_term["head_corr"] + type_term["head_corr"],
                          atol=1e-7)
    assert label_term["head_dist"].abs().sum() == 0 and total["head_dist"].abs().sum() > 0
    assert type_term["corr_proj"].abs().sum() == 0


def test_wrong_combinations():
    out, y, t, _ = _inputs(0, False)
    with pytest.raises(ValueError, match="vit has no distillation token"):
        distillation_loss(Logits(out.cls), y, t, distill="hard")
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(Logits(out.cls, out.dist), y, distill="hard")
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(Logits(out.cls, out.dist), y, t, distill="none")
    with pytest.raises(ValueError, match="types"):
        distillation_loss(out, y, t, distill="hard")
    with pytest.raises(ValueError, match="labels must be"):
        distillation_loss(Logits(out.cls), y[:3], distill="none")
    with pytest.raises(ValueError, match="teacher_logits must be"):
        distillation_loss(Logits(out.cls, out.dist), y, t[:, :5], distill="soft")
    with pytest.raises(ValueError, match="distill must be"):
        distillation_loss(Logits(out.cls), y, distill="kl")
