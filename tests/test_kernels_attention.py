"""kernels/attention.py against PyTorch's attention, forward and every gradient.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA the same checks run the compiled kernels.
The reference is SDPA in float64. Outputs are poisoned with NaN (every `new_empty` the ops make is
NaN-filled) so an element a kernel forgets to write fails the comparison.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels

A = importlib.import_module("kernels.attention")  # `kernels.attention` is the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not A.INTERPRETED:
    pytest.skip("no CUDA and TRITON_INTERPRET=1 was not set before triton was imported",
                allow_module_level=True)

# Per-dtype tolerance against a float64 reference (atol, rtol). fp16: inputs rounded to 11 bits
# and P cast to fp16 before the P V and dS K dots, errors ~1e-3 on O(1) values.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3)}

# Every sequence length around the kernels' edges (1, 2, a block of 16 and 64 either side, the
# students' 65-67, the 128-key tile's edge, the teacher's 197), each head size, both CPU dtypes.
NS = [1, 2, 17, 63, 64, 65, 67, 127, 128, 129, 197]
DS = [32, 64, 128]
DTYPES = [torch.float32, torch.float16]


def _inputs(B, H, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    go = torch.randn(B, H, N, D, generator=g)  # grad_output, not all ones
    q = q * 1.5  # a peakier softmax than unit scale
    return [x.to(DEVICE, dtype) for x in (q, k, v, go)]


def _reference(q, k, v, go):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), go.double()))


def _close(name, actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype, name
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
def test_attention_matches_sdpa(N, D, dtype, poisoned):
    q, k, v, go = _inputs(2, 2, N, D, dtype, seed=N + D)  # B=2, H=2: batch and head offsets both used
    ref = _reference(q, k, v, go)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = kernels.attention(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), go)
    for name, a, e in zip(("o", "dq", "dk", "dv"), (o, *grads), ref):
        _close(name, a, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("N", NS)
def test_attention_packed_matches_sdpa(N, dtype, poisoned):
    B, H, D = 2, 3, DS[N % 3]  # the model's 3 heads; head sizes cycle over N
    q, k, v, go = _inputs(B, H, N, D, dtype, seed=1)
    ref = _reference(q, k, v, go)
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).contiguous().requires_grad_()  # (B, N, 3, H, D)
    assert torch.equal(qkv[:, :, 1].transpose(1, 2), k)
    o = kernels.attention_packed(qkv)  # (B, N, H*D)
    assert o.shape == (B, N, H * D) and o.is_contiguous()
    (dqkv,) = torch.autograd.grad(o, qkv, go.transpose(1, 2).reshape(B, N, H * D))
    assert dqkv.shape == qkv.shape and (dqkv.is_contiguous() or not A.supported(N, D, dtype))  # copy-free
    _close("o", o.view(B, N, H, D).transpose(1, 2), ref[0], dtype)
    for i, name in enumerate(("dq", "dk", "dv")):
        _close(name, dqkv[:, :, i].transpose(1, 2), ref[1 + i], dtype)


def test_many_heads_one_dimensional_grid(poisoned):
    """The long kernel's 1-D grid (query block fastest) over B*H = 96 heads x 2 blocks, every head
    checked; the grid stays on axis 0 even at the teacher's largest batches."""
    B, H, N, D = 32, 3, 129, 32
    q, k, v, _ = _inputs(B, H, N, D, torch.float16, seed=6)
    o = kernels.attention(q, k, v)
    _close("o", o, F.scaled_dot_product_attention(q.double(), k.double(), v.double()), torch.float16)
    assert A.fwd_grid(B, H, N) == (B * H * 2,)
    assert A.fwd_grid(1024, 3, 67) == (3072,)  # the students: one program per (batch, head)
    assert len(A.fwd_grid(65536, 6, 197)) == 1  # 786,432 programs: past axes 1-2's 65,535, on axis 0


def test_configs_pruned_and_untimed_in_the_interpreter():
    """Pruning keeps only configs listed as fitting, one under the interpreter (so it never tunes);
    the students' shape (bf16/fp16, D=64) has a fitting forward and backward."""
    for (kernel, bits, BLOCK_D), fit in A.FITS.items():
        assert fit and fit <= {A._key(c) for c in A.CONFIGS[kernel]}, (kernel, bits, BLOCK_D)
        kept = A.prune(kernel, A.CONFIGS[kernel], 128, BLOCK_D, bits // 8)
        assert len(kept) == 1 and A._key(kept[0]) in fit
    assert A.prune("bwd_short", A.CONFIGS["bwd_short"], 128, 128, 2) == []  # D=128: PyTorch backward
    for dtype in (torch.bfloat16, torch.float16):
        assert A.supported(67, 64, dtype) and A.fits("bwd_short", 64, dtype) and A.supported(197, 64, dtype)
    assert not A.supported(67, 128, torch.float32)  # nothing fits: SDPA


def test_packed_reads_strided_qkv_from_a_linear(poisoned):
    """The model's case: qkv = Linear(x).reshape(B, N, 3, H, D), gradients back to the Linear."""
    B, N, H, D = 2, 67, 3, 32
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, N, H * D, generator=g).to(DEVICE)
    lin = torch.nn.Linear(H * D, 3 * H * D).to(DEVICE)
    go = torch.randn(B, N, H * D, generator=g).to(DEVICE)

    def run(fn):
        lin.zero_grad()
        y = fn(lin(x).reshape(B, N, 3, H, D))
        y.backward(go)
        return y.detach().clone(), lin.weight.grad.clone()

    def sdpa_packed(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)

    for a, e in zip(run(kernels.attention_packed), run(sdpa_packed)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs_and_bad_packed_shape(poisoned):
    q, k, v, go = _inputs(2, 17, 3, 32, torch.float32, seed=5)  # (B, N, H, D) memory order
    q, k, v, go = (x.transpose(1, 2) for x in (q, k, v, go))  # (B, H, N, D) views, not contiguous
    ref = _reference(q, k, v, go)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = kernels.attention(q, k, v)
    for name, a, e in zip(("o", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, (q, k, v), go)), ref):
        _close(name, a, e, torch.float32)
    with pytest.raises(ValueError, match="qkv of shape"):
        kernels.attention_packed(torch.zeros(2, 5, 4, 3, 8))


def test_forward_saves_row_logsumexp(poisoned):
    B, H, N, D = 2, 3, 67, 32
    q, k, v, _ = _inputs(B, H, N, D, torch.float32, seed=3)
    o, lse = A._attention_fwd(q, k, v)
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1).reshape(B * H, N), atol=1e-5, rtol=1e-5)


def test_triton_path_really_runs(monkeypatch):
    """With the fallback made to raise, both entry points still work, so the kernels ran."""
    def no_fallback(*args):
        raise AssertionError("fell back to SDPA")

    monkeypatch.setattr(A, "reference_attention", no_fallback)
    q, k, v, _ = _inputs(1, 2, 17, 32, torch.float32)
    torch.testing.assert_close(kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).contiguous()
    kernels.attention_packed(qkv)
    with pytest.raises(AssertionError, match="fell back"):  # and the fallback is what we patched
        kernels.attention(q, k[:, :, :5], v[:, :, :5])  # cross-attention shapes: SDPA's job


def test_custom_ops_registration():
    """Schema, fake (meta) functions and autograd registration agree with the real kernels."""
    q, k, v, _ = _inputs(1, 2, 17, 32, torch.float32, seed=4)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(A._attention_fwd, (q, k, v))
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).detach().contiguous().requires_grad_()
    torch.library.opcheck(A._attention_packed_fwd, (qkv,))


def test_compile_traces_without_graph_break():
    """torch.compile(fullgraph=True) errors on any graph break; aot_eager also traces the backward."""
    B, N, H, D = 1, 17, 2, 32
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, requires_grad=True)

    def step(qkv):
        return (kernels.attention_packed(qkv) ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(qkv)
    (g,) = torch.autograd.grad(loss, qkv)
    qkv2 = qkv.detach().requires_grad_()
    (g2,) = torch.autograd.grad(step(qkv2), qkv2)
    torch.testing.assert_close(g, g2)


def test_kernels_folder_alone_without_triton(tmp_path):
    """kernels/ copied on its own into a project without triton (and without the kit's losses.py
    or model.py): PyTorch paths, same contracts."""
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "kernels"), tmp_path / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, torch.nn.functional as F, kernels\n"
        "assert not kernels.HAS_TRITON and 'losses' not in sys.modules\n"
        "q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)\n"
        "assert torch.equal(kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))\n"
        "qkv = torch.stack([q, k, v], 2).transpose(1, 3)\n"
        "assert torch.equal(kernels.attention_packed(qkv), kernels.sdpa_packed(qkv))\n"
        "assert kernels.attention_packed(qkv).shape == (2, 5, 16)\n"
        "out = (torch.randn(4, 10), None, None, None)\n"
        "y = torch.tensor([1, 2, 3, 4])\n"
        "loss, parts = kernels.distillation_loss(out, y, distill='none')\n"
        "assert torch.allclose(loss, F.cross_entropy(out[0], y, label_smoothing=0.1))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr


def test_bytes_moved_counted_from_the_kernels_match_their_model():
    """`kernels.bench --bytes` counts our kernels' loads and stores in the interpreter; the traffic
    model that prices the previous kernels and FlashAttention-2 prices ours the same way."""
    bench = importlib.import_module("kernels.bench")
    for N, D in [(67, 64), (197, 64), (17, 32)]:
        fwd, bwd = bench.counted_attention_bytes(N, D)
        assert fwd == bench.traffic_model("ours", "fwd", N, D)
        if N <= A.SHORT_N:  # the long backward is PyTorch, not a kernel
            assert bwd == bench.traffic_model("ours", "bwd", N, D)
    t = 67 * 64 * 2  # the accounting of the previous kernels: about 24 u forward + backward
    assert round((bench.traffic_model("previous", "fwd", 67, 64) + bench.traffic_model("previous", "bwd", 67, 64)) / t) == 24


def test_gpu_summary_lines_and_json(tmp_path):
    """bench/gpu.sh's last step, on made-up results: one PASS/FAIL line per goal and results.json."""
    import json
    bench = importlib.import_module("kernels.bench")
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="5" failures="0" errors="0" skipped="1"/></testsuites>')
    goals = bench.print_goals({"attention kernel fwd+bwd vs fastest SDPA": 1.4, "loss fwd+bwd vs eager B1024": 3.0})
    (tmp_path / "kernels_bench.json").write_text(json.dumps({"rows": [], "goals": goals}))
    assert bench.summarize(str(tmp_path)) == 1  # the loss goal failed
    got = json.loads((tmp_path / "results.json").read_text())["goals"]
    assert [(g["name"], g["status"]) for g in got] == [
        ("gpu tests passed", "PASS"), ("attention kernel fwd+bwd vs fastest SDPA", "PASS"),
        ("loss fwd+bwd vs eager B1024", "FAIL")]


@pytest.mark.parametrize("kernel,N", [("fwd_short", 67), ("bwd_short", 67), ("fwd_long", 197)])
def test_every_fitting_config(kernel, N, monkeypatch, poisoned):
    """Autotuning may pick any config in FITS: each one, forced, gives the same result (fp16, D=64)."""
    tuner = {"fwd_short": A._fwd_short, "bwd_short": A._bwd_short, "fwd_long": A._fwd_long}[kernel]
    q, k, v, go = _inputs(1, 2, N, 64, torch.float16, seed=7)
    ref = _reference(q, k, v, go)
    configs = [c for c in A.CONFIGS[kernel] if A._key(c) in A.FITS[(kernel, 16, 64)]]
    for c in configs:
        monkeypatch.setattr(A, "prune", lambda *args, c=c: [c])
        tuner.cache.clear()
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = kernels.attention(*xs)
        got = [o, *torch.autograd.grad(o, xs, go)] if kernel == "bwd_short" else [o]
        assert tuner.best_config is c
        for name, a, e in zip(("o", "dq", "dk", "dv"), got, ref):
            _close(f"{name} {c}", a, e, torch.float16)
    tuner.cache.clear()
    assert len(configs) >= 2


def test_gpu_benchmark_code_runs_at_toy_sizes(monkeypatch, capsys):
    """The GPU benchmark's code paths (every impl, the goal names), on CPU at toy shapes with one
    untimed call per measurement; the timings mean nothing, the rows and goals must all appear."""
    bench = importlib.import_module("kernels.bench")
    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    monkeypatch.setattr(bench, "TRAIN", (2, 3, 67, 32))
    monkeypatch.setattr(bench, "TEACHER", (1, 2, 197, 32))
    monkeypatch.setattr(bench, "LOSS_BATCHES", (8,))
    monkeypatch.setattr(bench, "_bench", lambda fn, params=None: (fn(), 1.0)[1])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # inductor on CPU is minutes
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)  # restored after
    rows, goals = bench.bench_attention(torch.float16)
    loss_rows, loss_goals = bench.bench_loss(torch.float32)
    bench.print_table(rows + loss_rows)
    assert set(bench.GOALS) <= set(goals) | set(loss_goals)
    impls = {r["impl"] for r in rows}
    assert {"triton", "triton packed layer", "sdpa packed layer (model, kernels off)", "sdpa[math]"} <= impls
    assert len(loss_rows) == 5 * 3
