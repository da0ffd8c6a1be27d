"""model.py against timm as the oracle, plus the forward contract and the loaders' errors."""
import pytest
import torch
from safetensors.torch import save_file

import model
from model import Logits, ModelFileError, create_model, load_teacher

timm = pytest.importorskip("timm")  # test-only oracle (requirements-test.txt)

STUDENT_KW = {"img_size": 32, "patch_size": 4, "num_classes": 10}


def _randomize(m, seed=0):
    """Non-trivial values everywhere (timm inits LayerScale at 1e-6 and biases at 0, which hides
    bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            shift = 1.0 if p.ndim == 1 and p.numel() > 1 else 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + shift)
    return m


@pytest.fixture(scope="module")
def timm_teacher_file(tmp_path_factory):
    t = _randomize(timm.create_model("deit3_small_patch16_224", pretrained=False)).eval()
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(path))
    return t, path


def test_parameter_counts():
    counts = {n: model.count_params(create_model(n)) for n in model.MODELS}
    print("parameter counts:", counts)
    assert counts["deit3_small"] == 22_059_496  # timm's published DeiT-III Small, 1000-way head
    timm_vit = sum(p.numel() for p in timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, **STUDENT_KW).parameters())
    timm_deit = sum(p.numel() for p in timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, **STUDENT_KW).parameters())
    assert model.count_params(create_model("vit", layout="timm")) == timm_vit == 5_362_762  # README
    assert model.count_params(create_model("deit", layout="timm")) == timm_deit
    assert (counts["vit"], counts["deit"], counts["cdeit"]) == (5_399_434, 5_364_692,
                                                                5_367_319)  # README
    # the thesis layout has no final LayerNorm (192 weights + 192 biases)
    assert counts["deit"] == timm_deit - 2 * 192
    # thesis 2.1's MLP head: Linear(192, 192) + GELU + Linear(192, 10) in place of Linear(192, 10)
    assert counts["vit"] - (timm_vit - 2 * 192) == 192 * 192 + 192
    # cdeit = deit + corr_token (192) + its pos_embed row (192) + head_corr (192*11+11)
    #         + the strategy-2 Linear(11 -> 10)
    assert counts["cdeit"] - counts["deit"] == 192 + 192 + 192 * 11 + 11 + 11 * 10 + 10


def test_teacher_matches_timm(timm_teacher_file):
    t, path = timm_teacher_file
    ours = load_teacher(path, num_classes=1000).eval()
    assert len(ours.state_dict()) == len(t.state_dict()) == 176
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = t(x), ours(x)
        feats_ref, feats = t.forward_features(x), ours.forward_features(x)
    assert (got - ref).abs().max().item() <= 1e-5
    assert (feats - feats_ref).abs().max().item() <= 1e-5


def test_teacher_new_head_keeps_backbone(timm_teacher_file):
    t, path = timm_teacher_file
    ours = load_teacher(path, num_classes=10).eval()
    assert ours.head.weight.shape == (10, 384)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x)[:, 0], t.forward_features(x)[:, 0],
                              atol=1e-5)


@pytest.mark.parametrize("name,timm_name", [("vit", "deit_tiny_patch16_224"),
                                            ("deit", "deit_tiny_distilled_patch16_224")])
def test_student_loads_into_timm(name, timm_name):
    # layout="timm" (vit: with its single Linear head) is timm's; the default thesis layout is not
    ours = _randomize(create_model(name, layout="timm"), seed=2).eval()
    ref = timm.create_model(timm_name, pretrained=False, **STUDENT_KW).eval()
    ref.load_state_dict(ours.state_dict())  # strict: same keys, same shapes
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_vit_mlp_head():
    """thesis 2.1: the class token -> Linear(D, D) -> GELU -> Linear(D, classes); deit keeps
    Linear heads."""
    m = _randomize(create_model("vit", depth=1), seed=4).eval()
    lin1, act, lin2 = m.head
    assert isinstance(act, torch.nn.GELU)
    assert lin1.weight.shape == (192, 192) and lin2.weight.shape == (10, 192)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = m.forward_features(x)[:, 0]
        want = torch.nn.functional.gelu(cls @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
        assert torch.allclose(m(x), want, atol=1e-5)
    assert isinstance(create_model("deit").head, torch.nn.Linear)
    assert isinstance(create_model("cdeit").head, torch.nn.Linear)
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False, **STUDENT_KW)
    with pytest.raises(RuntimeError, match="head"):
        ref.load_state_dict(m.state_dict())       # the README: only layout="timm" loads into timm
    with pytest.raises(ValueError, match="head"):
        create_model("vit", head="tanh")


@pytest.mark.parametrize("name", ["vit", "deit", "cdeit"])
def test_thesis_layout(name):
    """The thesis's code where its text is silent: no final norm (the heads read the last block's
    tokens), PyTorch's default Linear init, randn tokens, one drop-path rate in every block."""
    torch.manual_seed(0)
    m = create_model(name, drop_path=0.1)
    assert m.cfg.layout == "thesis" and isinstance(m.norm, torch.nn.Identity)
    assert not any(k.startswith("norm.") for k in m.state_dict())
    assert [b.drop_path.p for b in m.blocks] == [0.1] * 12
    # PyTorch's default: kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), biases alike (not zero)
    for lin in (m.blocks[0].attn.qkv, m.blocks[5].mlp.fc2, m.head_dist or m.head[0]):
        bound = 1 / lin.in_features ** 0.5
        w, b = lin.weight, lin.bias
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
        assert b.abs().max() <= bound and b.abs().min() > 0
    # the patch Conv2d: the same distribution as the code's nn.Linear(C*p*p, D)
    assert m.patch_embed.proj.weight.abs().max() <= 1 / (3 * 4 * 4) ** 0.5
    for t in (m.cls_token, m.pos_embed, m.dist_token, m.corr_token):
        if t is not None:
            # randn, not 0.02
            assert t.abs().max() > 2 and t.std().item() == pytest.approx(1.0, rel=0.3)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():  # the heads read the last block's output itself
        tokens = [t.expand(2, -1, -1) for t in (m.cls_token, m.dist_token, m.corr_token)
                  if t is not None]
        f = m.blocks(torch.cat(tokens + [m.patch_embed(x)], 1) + m.pos_embed)
        assert torch.allclose(m.forward_features(x), f, atol=1e-6)
        assert torch.allclose(m.forward_tokens(x)["cls"], f[:, 0], atol=1e-6)


def test_timm_layout_and_old_checkpoints():
    """layout="timm" is today's timm model; a checkpoint's model_args without `layout` (written
    before it existed) rebuild that layout, head included."""
    torch.manual_seed(0)
    m = create_model("deit", layout="timm", drop_path=0.1)
    assert isinstance(m.norm, torch.nn.LayerNorm) and m.cfg.head == "linear"
    rates = [b.drop_path.p for b in m.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert not m.blocks[0].attn.qkv.bias.any()
    assert m.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert create_model("vit", layout="timm").cfg.head == "linear"
    assert create_model("vit", layout="timm", head="mlp").cfg.head == "mlp"
    # an old vit file
    old = create_model("vit", **model.saved_model_args({"head": "mlp", "depth": 1}))
    assert old.cfg.layout == "timm" and old.cfg.head == "mlp"
    assert isinstance(old.norm, torch.nn.LayerNorm)
    assert model.saved_model_args({"layout": "thesis"}) == {"layout": "thesis"}
    with pytest.raises(ValueError, match="layout"):
        create_model("deit", layout="jax")


def test_forward_contract():
    x = torch.randn(3, 3, 32, 32)
    small = {"depth": 2, "embed_dim": 48, "num_heads": 2}
    for name, strategy in [("vit", 2), ("deit", 2), ("cdeit", 1), ("cdeit", 2), ("cdeit", 3)]:
        m = create_model(name, strategy=strategy, **small)
        out = m.train()(x)
        assert isinstance(out, Logits) and out.cls.shape == (3, 10)
        assert (out.dist is None) == (name == "vit")
        assert (out.corr is None) == (name != "cdeit")
        if name == "cdeit":
            assert out.corr.shape == (3, 11)
            assert (out.corr_cls is None) == (strategy == 1)
        m.eval()
        with torch.no_grad():
            y = m(x)
            f = m.forward_features(x)
            cls, dist = m.head(f[:, 0]), (m.head_dist(f[:, 1]) if m.head_dist else None)
            if name == "vit":
                expect = cls
            elif name == "deit" or strategy == 1:
                expect = (cls + dist) / 2
            else:
                expect = (cls + dist + m.corr_proj(m.head_corr(f[:, 2]))) / 3
        assert y.shape == (3, 10) and torch.allclose(y, expect, atol=1e-6)
        toks = m.forward_tokens(x)
        want = {"vit": {"cls"}, "deit": {"cls", "dist"}, "cdeit": {"cls", "dist", "corr"}}
        assert set(toks) == want[name]
        assert torch.allclose(toks["cls"], f[:, 0])


def test_strategy3_shapes():
    m = create_model("cdeit", strategy=3)
    lin = [l for l in m.corr_proj if isinstance(l, torch.nn.Linear)]
    assert lin[0].in_features == 11 and lin[-1].out_features == 10


def test_bad_options():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet")
    with pytest.raises(ValueError, match="strategy"):
        create_model("cdeit", strategy=4)
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("vit", heads=3)


def test_bad_teacher_files(tmp_path, timm_teacher_file):
    t, good = timm_teacher_file
    sd = {k: v.contiguous() for k, v in t.state_dict().items()}

    with pytest.raises(ModelFileError, match="not found"):
        load_teacher(tmp_path / "nope.safetensors")

    missing = dict(sd); del missing["blocks.3.ls1.gamma"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelFileError, match=r"missing: blocks\.3\.ls1\.gamma"):
        load_teacher(tmp_path / "missing.safetensors")

    extra = dict(sd); extra["head_dist.weight"] = torch.zeros(10, 384)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelFileError, match=r"unexpected: head_dist\.weight"):
        load_teacher(tmp_path / "extra.safetensors")

    shaped = dict(sd); shaped["pos_embed"] = torch.zeros(1, 197, 384)
    save_file(shaped, str(tmp_path / "shaped.safetensors"))
    with pytest.raises(ModelFileError, match=r"mis-shaped: pos_embed \(1, 197, 384\)"):
        load_teacher(tmp_path / "shaped.safetensors")

    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04\x95 not a safetensors file at all")
    for bad in ("trunc.safetensors", "pickle.pt"):
        with pytest.raises(ModelFileError) as e:
            load_teacher(tmp_path / bad)
        assert bad in str(e.value) and "\n" not in str(e.value)


def test_student_weights_checked_like_the_teacher(tmp_path):
    """load_student runs the same validator as load_teacher: every missing, unexpected and
    mis-shaped key named on one line, nothing loaded."""
    net = create_model("deit", depth=1, embed_dim=32, num_heads=2)
    args = {"depth": 1, "embed_dim": 32, "num_heads": 2, "layout": "thesis"}
    sd = net.state_dict()
    bad = {k: v for k, v in sd.items() if k != "dist_token"}
    bad["pos_embed"] = torch.zeros(1, 3, 32)
    bad["head_corr.weight"] = torch.zeros(11, 32)
    ck = {"kind": model.STUDENT_KIND, "version": 1, "model_name": "deit", "model_args": args,
          "model": bad, "data_args": {}}
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError) as e:
        model.load_student(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "\n" not in msg and "weights do not fit the model" in msg, msg
    assert "missing: dist_token (1)" in msg and "unexpected: head_corr.weight (1)" in msg, msg
    assert "mis-shaped: pos_embed (1, 3, 32) != (1, 66, 32) (1)" in msg, msg
    torch.save({**ck, "model": sd}, tmp_path / "good.pt")
    loaded, _ = model.load_student(tmp_path / "good.pt")
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ModelFileError, match="not a state dict"):
        model.check_weights([1, 2], sd, "x")
