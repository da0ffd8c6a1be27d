"""Fused Triton kernels for the hot training step (the thesis model's attention and Eq. 4-7 loss).

    attention(q, k, v)        drop-in for F.scaled_dot_product_attention(q, k, v), (B, H, N, D)
    attention_packed(qkv)     qkv (B, N, 3, H, D) from the qkv Linear -> (B, N, H*D)
    distillation_loss(...)    same signature and result as losses.distillation_loss
    sdpa_packed(qkv)          attention_packed's contract through PyTorch's SDPA (the fallback)
    verify                    the kernels' first-use self-check: set_mode, agree, verdicts

CUDA tensors run the Triton kernels; CPU tensors run them only under the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported), otherwise PyTorch (reference.py). Without
triton installed, everything runs reference.py, which needs torch only: the folder can be copied
into another project on its own.
"""
from . import verify
from .reference import sdpa_packed

try:
    from .attention import attention, attention_packed
    from .distill_loss import distillation_loss
    HAS_TRITON = True
except ImportError:  # no triton on this platform: the PyTorch paths, same contracts
    from .reference import distillation_loss
    from .reference import sdpa as attention
    from .reference import sdpa_packed as attention_packed
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "attention", "attention_packed", "distillation_loss", "sdpa_packed",
           "verify"]
