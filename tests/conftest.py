"""Test-session set-up shared by every test file.

Triton's interpreter must be switched on before triton is first imported (it replaces @triton.jit
functions at decoration time), and torch._dynamo imports triton, so it is set here, before any
test module is collected. Only on machines without CUDA: there the kernel tests run on CPU
tensors through the interpreter; on a GPU the same tests run the compiled kernels on CUDA tensors.
model.py only calls the kernels on CUDA tensors, so other CPU tests are unaffected.

`smoke_run`: the full-size offline run, once per test session, shared by tests/test_train.py
(checks the run) and tests/test_eval.py (evaluates its checkpoint). `digits_files`: real images as
CIFAR files, shared by tests/test_learning.py and the tests that train tests/digits_student.py.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption(
        "--test-timeout",
        type=float,
        default=0,
        metavar="SECONDS",
        help="fail any one test that runs longer (SIGALRM; for machines without pytest-timeout, "
        "e.g. bench/gpu.sh on a GPU image with no internet)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device (skipped without one); bench/gpu.sh runs these"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """--test-timeout: the test fails with a TimeoutError when the alarm fires and the next one
    runs. (A call stuck inside C code is only interrupted when it returns to Python; bench/gpu.sh's
    per-step `timeout` is the backstop.)"""
    limit = item.config.getoption("--test-timeout")
    if not limit:
        yield
        return
    import signal

    def expired(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past --test-timeout {limit:g} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`python train.py --model cdeit --distill hard --dataset synthetic --device cpu` as a user
    types it (only --data-dir and --out-dir moved into a temp folder; the synthetic defaults keep it
    small: 2,200 images, 1 epoch, batch 64). Returns the run folder (ckpt.pt, best.pt, config.json,
    summary.csv); its stdout is saved beside it as ../stdout.txt."""
    base = tmp_path_factory.mktemp("smoke")
    out = base / "out"
    cmd = [
        sys.executable, "train.py", "--model", "cdeit", "--distill", "hard", "--dataset",
        "synthetic", "--device", "cpu", "--data-dir", str(base / "data"), "--out-dir", str(out)
    ]
    # one thread: the run is tiny, and OpenMP threads waiting on busy cores only slow it down
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False
    )
    (base / "stdout.txt").write_text(r.stdout)
    if r.returncode != 0:
        pytest.fail("smoke run failed:\n" + r.stdout[-3000:] + r.stderr[-3000:])
    return out


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory):
    """scikit-learn's real handwritten digits as CIFAR-10 / CIFAR-10-C files (15 corruptions) and a
    tiny random teacher (tests/test_learning.write_digits), written once per session and shared by
    tests/test_learning.py and tests/digits_student.py's users. Returns the data folder (a str)."""
    from test_learning import write_digits

    import teacher

    root = str(tmp_path_factory.mktemp("digits"))
    write_digits(root)
    teacher.write_synthetic_teacher(os.path.join(root, "teacher.safetensors"))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny batches and models gain nothing from more, and
    threads waiting on busy cores (OpenMP barriers) make small ops much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN (Tensor.new_empty is patched), so an element a kernel never
    writes fails."""
    real = torch.Tensor.new_empty

    def new_empty(self, *args, **kwargs):
        t = real(self, *args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    assert torch.zeros(1).new_empty(3).isnan().all()  # the poison is live
