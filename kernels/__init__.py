"""Fused kernels for the hot training step.

`attention(q, k, v)` is a drop-in for `F.scaled_dot_product_attention(q, k, v)` on (B, H, N, D)
tensors; `attention_packed(qkv)` takes the qkv projection's packed output (B, N, 3, H, D) and
returns (B, N, H*D), the layout the model's output projection wants.

For now both use PyTorch's SDPA; the Triton kernels replace them on CUDA (issue: Triton kernels).
"""
import torch
import torch.nn.functional as F


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attention_packed(qkv):
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
    return attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
