"""Test-session set-up shared by every test file.

Triton's interpreter must be switched on before triton is first imported (it replaces @triton.jit
functions at decoration time), and torch._dynamo imports triton, so it is set here, before any test
module is collected. Only on machines without CUDA: there the kernel tests run on CPU tensors
through the interpreter; on a GPU the same tests run the compiled kernels on CUDA tensors.
model.py only calls the kernels on CUDA tensors, so other CPU tests are unaffected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); bench/gpu.sh runs these")
