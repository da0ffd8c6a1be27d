"""Fused Triton kernels for the hot training step (seed model's attention and Eq. 4-7 loss).

    attention(q, k, v)        drop-in for F.scaled_dot_product_attention(q, k, v), (B, H, N, D)
    attention_packed(qkv)     qkv (B, N, 3, H, D) from the qkv Linear -> (B, N, H*D)
    distillation_loss(...)    same signature and result as losses.distillation_loss

CUDA tensors run the Triton kernels; CPU tensors run them only under the Triton interpreter
(TRITON_INTERPRET=1 set before triton is imported), otherwise PyTorch (SDPA / an eager loss).
Without triton installed, everything falls back to PyTorch. attention.py and distill_loss.py are
standalone (torch + triton only): copy either into another project on its own.
"""
try:
    from .attention import attention, attention_packed
    from .distill_loss import distillation_loss
    HAS_TRITON = True
except ImportError:  # no triton on this platform: the PyTorch paths, same contracts
    import torch.nn.functional as _F

    HAS_TRITON = False

    def attention(q, k, v):
        return _F.scaled_dot_product_attention(q, k, v)

    def attention_packed(qkv):
        B, N, _, H, D = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        return attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)

    def distillation_loss(*args, **kwargs):
        from losses import distillation_loss as eager  # imported late: losses.py may import us
        return eager(*args, **kwargs)

__all__ = ["attention", "attention_packed", "distillation_loss", "HAS_TRITON"]
