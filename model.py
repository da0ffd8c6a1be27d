"""Vision transformers for the thesis's experiments, from scratch (torch only).

One transformer serves four architectures, picked by name in `create_model`:
  vit          the thesis's baseline student: DeiT-Tiny sizes, one class token, a two-layer MLP head
               (thesis 2.1, 3.2)
  deit         vit + a distillation token and its head (thesis 2.3, Touvron et al. 2020)
  cdeit        deit + a corruption token predicting the image type, strategies 1/2/3 (thesis 3.3)
  deit3_small  the teacher: DeiT-III Small, LayerScale, patch 16 at 224px (thesis 3.2, 4.1)

Two layouts (ViTConfig.layout), identical in shapes and keys except the final norm:
  "thesis" (the students' default) where the thesis's text is silent, its public code decides (the
           models module: `VisionTransformer`, `DistillVisionTransformer`,
           `CorruptDistillVisionTransformer`; the modules file: `PatchEmbedding`,
           `VisionTransformerEncoder`): pre-norm blocks and NO final LayerNorm (the heads read the
           last block's tokens), no init code (every Linear keeps PyTorch's default init), the
           tokens and position embedding drawn with torch.randn (std 1), the same stochastic-depth
           rate in every block, dropout only after each residual branch.
  "timm"   timm's / DeiT's VisionTransformer: a final LayerNorm, trunc-normal(0.02) Linears and
           tokens, zero biases, stochastic depth ramped linearly 0 -> drop_path over depth, a single
           Linear class head for vit. The teacher (it loads timm's DeiT-III file) always uses it.

State-dict keys follow timm's, so timm's published DeiT-III file loads here unchanged, and a vit /
deit built with layout="timm" loads into timm's deit_tiny(_distilled)_patch16_224 built with
img_size=32, patch_size=4, num_classes=10, giving the same logits. CdeiT's extras (`corr_token`,
`head_corr`, `corr_proj`) have names timm does not use.

Forward contract:
  eval mode  -> (B, num_classes) class logits; deit averages cls and dist, cdeit strategies 2/3
                also average in corr_proj(corruption logits) (thesis 3.3).
  train mode -> Logits(cls, dist, corr, corr_cls), None where the model lacks the head.
  forward_tokens(x) -> the special tokens the heads read (after the final norm in the timm layout),
                for thesis 4.4's cosine analysis.
"""
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from kernels import attention_packed, sdpa_packed  # Triton on CUDA; SDPA (torch only) otherwise


class Logits(NamedTuple):
    cls: torch.Tensor                         # (B, num_classes) from the class token
    dist: torch.Tensor | None = None       # (B, num_classes) from the distillation token
    corr: torch.Tensor | None = None       # (B, num_types) from the corruption token
    corr_cls: torch.Tensor | None = None   # (B, num_classes) = corr_proj(corr), strategies 2/3


class ModelFileError(RuntimeError):
    """A weights file that is missing, unreadable or does not match the architecture."""


# ----------------------------------------------------------------------------- building blocks

class Attention(nn.Module):
    def __init__(self, dim, num_heads, drop=0.0, fused_attn=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, 3 * dim)  # rows [q all heads | k all heads | v all heads]
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x):
        B, N, _ = x.shape  # (B, N, C)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, hd)
        attend = attention_packed if self.fused_attn and x.is_cuda else sdpa_packed
        y = attend(qkv)  # (B, N, C), no transposes around the kernel
        return self.proj_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, dim, hidden, drop=0.0, drop_hidden=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm and the DeiT-III weights use
        # timm drops after the GELU too; the thesis's code does not
        self.drop_hidden = nn.Dropout(drop_hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop_hidden(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale of DeiT-III / CaiT (timm key: `ls1.gamma`)."""
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample (Huang et al. 2016, thesis 3.1)."""
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm encoder block: x + ls1(attn(norm1(x))), x + ls2(mlp(norm2(x))) (thesis 2.1)."""
    def __init__(self, dim, num_heads, mlp_ratio, init_values, drop, drop_path, fused_attn,
                 drop_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, drop, fused_attn)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop, drop_hidden)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """A p x p, stride-p Conv2d (timm's key names). The thesis's code applies nn.Linear(C*p*p, D)
    to the flattened patches: the same map, and PyTorch's default init draws both from the same
    distribution (kaiming-uniform a=sqrt(5), fan_in = C*p*p, bias bound 1/sqrt(fan_in))."""
    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, num_patches, D)


# ----------------------------------------------------------------------------- the model

@dataclass
class ViTConfig:
    img_size: int = 32            # CIFAR-10 resolution
    patch_size: int = 4           # 32/4 -> 64 patches (the thesis never states P: ours)
    in_chans: int = 3
    num_classes: int = 10
    layout: str = "thesis"        # "thesis": the thesis's code's layout and init; "timm" (above)
    head: str = "linear"          # class head: "linear" (DeiT, timm) or "mlp" (Linear-GELU-Linear)
    embed_dim: int = 192          # DeiT-Tiny D (thesis 3.2)
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    distilled: bool = False       # add the distillation token + head_dist (DeiT)
    corruption_token: bool = False  # add the corruption token + head_corr (CdeiT)
    num_types: int = 11           # clean + the thesis's 10 corruptions (3.4)
    strategy: int = 2             # CdeiT inference strategy 1/2/3 (thesis 3.3); 2 is its best
    corr_hidden: int = 0          # strategy 3 FFN width; 0 -> num_types
    no_embed_class: bool = False  # DeiT-III: pos_embed covers patches only, tokens get none
    init_values: float = 0.0      # LayerScale init (DeiT-III); 0 -> no LayerScale
    drop_path: float = 0.0        # stochastic depth: every block (thesis), a ramp's last (timm)
    drop: float = 0.0             # dropout after each residual branch (timm: also pos_embed, GELU)
    fused_attn: bool = True       # use kernels.attention_packed on CUDA


MODELS = {
    "vit": ViTConfig(head="mlp"),   # thesis 2.1: the ViT baseline's two-layer MLP head
    "deit": ViTConfig(distilled=True),
    "cdeit": ViTConfig(distilled=True, corruption_token=True),
    "deit3_small": ViTConfig(img_size=224, patch_size=16, num_classes=1000, embed_dim=384,
                             num_heads=6, no_embed_class=True, init_values=1e-6, layout="timm"),
}
LAYOUTS = ("thesis", "timm")


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.strategy not in (1, 2, 3):
            raise ValueError(f"strategy must be 1, 2 or 3, got {cfg.strategy}")
        if cfg.head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {cfg.head!r}")
        if cfg.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {cfg.layout!r}")
        if cfg.corruption_token and not cfg.distilled:
            raise ValueError("the corruption token needs the distillation token (CdeiT extends "
                             "DeiT)")
        self.cfg = cfg
        timm_layout = cfg.layout == "timm"
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.num_prefix = 1 + int(cfg.distilled) + int(cfg.corruption_token)  # [cls, dist, corr]
        # the thesis's code (PatchEmbedding): cls_token and pos_embedding =
        # nn.Parameter(torch.randn(...));
        # its dist / corr tokens live in a class no revision shows, drawn the same way here
        token = torch.zeros if timm_layout else torch.randn  # timm: trunc-normal(0.02) below
        self.cls_token = nn.Parameter(token(1, 1, D))
        self.dist_token = nn.Parameter(token(1, 1, D)) if cfg.distilled else None
        self.corr_token = nn.Parameter(token(1, 1, D)) if cfg.corruption_token else None
        n_pos = self.patch_embed.num_patches + (0 if cfg.no_embed_class else self.num_prefix)
        self.pos_embed = nn.Parameter(token(1, n_pos, D))
        self.pos_drop = nn.Dropout(cfg.drop if timm_layout else 0.0)
        # DeiT ramps stochastic depth linearly over depth; the thesis's code passes one drop_path to
        # every VisionTransformerEncoder
        dpr = [cfg.drop_path] * cfg.depth
        if timm_layout:
            dpr = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.init_values, cfg.drop, dpr[i],
                  cfg.fused_attn, drop_hidden=cfg.drop if timm_layout else 0.0)
            for i in range(cfg.depth)])
        # the thesis's code: the heads read batch[:, 0] straight from the last encoder (no norm)
        self.norm = nn.LayerNorm(D, eps=1e-6) if timm_layout else nn.Identity()
        # thesis 2.1: ViT's class token feeds a two-layer MLP with a GELU between (hidden width D,
        # as the thesis's code, which used Tanh); DeiT's tokens feed single Linear heads (2.3).
        self.head = nn.Linear(D, cfg.num_classes) if cfg.head == "linear" else \
            nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.num_classes))
        self.head_dist = nn.Linear(D, cfg.num_classes) if cfg.distilled else None
        self.head_corr = nn.Linear(D, cfg.num_types) if cfg.corruption_token else None
        # thesis 3.3: strategy 2 projects the corruption logits to class space with one Linear,
        # strategy 3 with Linear -> GELU -> Linear; strategy 1 has no projection.
        self.corr_proj = None
        if cfg.corruption_token and cfg.strategy == 2:
            self.corr_proj = nn.Linear(cfg.num_types, cfg.num_classes)
        elif cfg.corruption_token and cfg.strategy == 3:
            hidden = cfg.corr_hidden or cfg.num_types
            self.corr_proj = nn.Sequential(nn.Linear(cfg.num_types, hidden), nn.GELU(),
                                           nn.Linear(hidden, cfg.num_classes))
        if timm_layout:  # the thesis's code has no init code: PyTorch's defaults stand
            self.apply(self._init_weights)
            for p in (self.pos_embed, self.cls_token, self.dist_token, self.corr_token):
                if p is not None:
                    nn.init.trunc_normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m):
        """timm's init: trunc-normal(0.02) Linear weights, zero biases (the patch Conv2d keeps
        PyTorch's)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        """Parameter names kept out of weight decay (timm's convention for tokens and pos_embed)."""
        return {"pos_embed", "cls_token", "dist_token", "corr_token"}

    def forward_features(self, x):
        """(B, C, H, W) normalised images -> (B, num_prefix + num_patches, D): the last block's
        tokens, after the final norm in the timm layout."""
        x = self.patch_embed(x)  # (B, P, D)
        prefix = [t.expand(x.shape[0], -1, -1)
                  for t in (self.cls_token, self.dist_token, self.corr_token) if t is not None]
        if self.cfg.no_embed_class:  # DeiT-III: position embedding on the patches only
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def forward_tokens(self, x):
        """The special tokens the heads read, {cls, dist, corr}, (B, D) each (thesis 4.4 compares
        them)."""
        f = self.forward_features(x)
        names = ["cls"] + ["dist"] * self.cfg.distilled + ["corr"] * self.cfg.corruption_token
        return {n: f[:, i] for i, n in enumerate(names)}

    def forward_heads(self, x):
        """Every head's logits, in either mode: Logits(cls, dist, corr, corr_cls)."""
        return self.read_heads(self.forward_tokens(x))

    def read_heads(self, tok):
        """forward_tokens' tokens -> Logits(cls, dist, corr, corr_cls)."""
        cls = self.head(tok["cls"])
        dist = self.head_dist(tok["dist"]) if self.head_dist is not None else None
        corr = self.head_corr(tok["corr"]) if self.head_corr is not None else None
        corr_cls = self.corr_proj(corr) if self.corr_proj is not None else None
        return Logits(cls, dist, corr, corr_cls)

    @staticmethod
    def average_heads(out):
        """The eval-mode class logits (B, num_classes) from Logits (thesis 3.3)."""
        if out.dist is None:
            return out.cls
        if out.corr_cls is None:
            return (out.cls + out.dist) / 2  # DeiT and CdeiT strategy 1
        return (out.cls + out.dist + out.corr_cls) / 3  # CdeiT strategies 2/3

    def forward(self, x):
        out = self.forward_heads(x)
        return out if self.training else self.average_heads(out)


def create_model(name, **overrides):
    """Build one of MODELS by name; keyword overrides replace ViTConfig fields. vit with
    layout="timm" gets timm's single Linear head unless `head` is given."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    unknown = set(overrides) - set(ViTConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}")
    cfg = replace(MODELS[name], **overrides)
    if cfg.layout == "timm" and "head" not in overrides:
        cfg = replace(cfg, head="linear")  # the layout that loads into timm's DeiT
    return VisionTransformer(cfg)


def saved_model_args(model_args):
    """A checkpoint's model_args -> create_model's overrides. Files written before `layout` existed
    were built in the timm layout, and load as they were built."""
    return {"layout": "timm", **model_args}


def param_groups(model, weight_decay):
    """AdamW groups: decay matrices, not biases, norms, LayerScale, tokens or pos_embed (nanoGPT,
    timm)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or n in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def load_teacher(path, num_classes=10, **overrides):
    """DeiT-III Small from timm's `model.safetensors` (no pickle), every key and shape checked.

    A 1000-way ImageNet head with num_classes != 1000 is dropped and a fresh head created:
    thesis 4.1 fits a new linear head on the frozen backbone. Any other mismatch raises
    ModelFileError listing the missing, unexpected and mis-shaped keys. A smaller test teacher
    states its sizes in the file's metadata ("model_args": JSON of depth / embed_dim / num_heads);
    explicit overrides win over them.
    """
    import json
    import os

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"teacher file {path}: not found (train.py downloads it into "
                             "--data-dir)")
    try:
        sd = load_file(path, device="cpu")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        sizes = json.loads(meta.get("model_args", "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelFileError(f"teacher file {path}: not a readable safetensors file "
                             f"({msg})") from None
    if not isinstance(sizes, dict) or not set(sizes) <= {"depth", "embed_dim", "num_heads"} \
            or not all(type(v) is int and v > 0 for v in sizes.values()):
        raise ModelFileError(f"teacher file {path}: metadata model_args must give positive integer "
                             f"depth / embed_dim / num_heads, got {meta.get('model_args')!r}")
    model = create_model("deit3_small", num_classes=num_classes, **{**sizes, **overrides})
    expected = model.state_dict()
    head = sd.get("head.weight")
    width = expected["head.weight"].shape[1:]
    if head is not None and head.shape[0] != num_classes and head.shape[1:] == width:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # a new head (thesis 4.1)
        for k in ("head.weight", "head.bias"):
            sd[k] = expected[k]
    check_weights(sd, expected, f"teacher file {path} does not match deit3_small")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_image(cfg: ViTConfig, train=True):
    """Matmul FLOPs of one image (2 per multiply-add), x3 for forward+backward when training."""
    n = (cfg.img_size // cfg.patch_size) ** 2
    t = n + 1 + int(cfg.distilled) + int(cfg.corruption_token)
    D, L = cfg.embed_dim, cfg.depth
    per_block = 2 * t * D * (3 * D + D + 2 * int(D * cfg.mlp_ratio)) + 2 * 2 * t * t * D
    total = L * per_block + 2 * n * D * cfg.in_chans * cfg.patch_size ** 2
    return total * (3 if train else 1)


# ----------------------------------------------------------------------------- trained students

STUDENT_KIND = "cdeit-kit/student"  # train.py's checkpoints
TEMPERATURE_KIND = "cdeit-kit/temperatures"  # eval.py --calibrate's sidecar beside a checkpoint


def first_line(e):
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"


# what each kind of file is, for the line that refuses a wrong one
EXPECTS = {
    "checkpoint": "a student checkpoint written by train.py (<out-dir>/best.pt or ckpt.pt)",
    "teacher head": "a teacher head written by train.py (data/cache/teacher-.../teacher_head.pt)",
}


def load_checked(path, what, kind, fields, hints=None):
    """torch.load(weights_only=True), then kind, version and fields checked: one clear line for
    each way a file can be bad (missing, truncated, tampered, another kind).
    hints: {other kind: advice}."""
    import os
    import pickle
    import re
    expects = EXPECTS.get(what, f"a {what}")
    if os.path.isdir(path):
        names = ("best.pt", "ckpt.pt", "teacher_head.pt")
        inside = [n for n in names if os.path.isfile(os.path.join(path, n))]
        raise ModelFileError(f"{path}: a folder; expected {expects}"
                             + (f", e.g. {os.path.join(path, inside[0])}" if inside else ""))
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: {what} not found (expected {expects})")
    with open(path, "rb") as f:
        start = f.read(64).lstrip()
    if start[:1] in (b"{", b"["):  # eval.py --json output passed where a checkpoint belongs
        raise ModelFileError(f"{path}: a JSON file (eval.py --json writes these; eval.py takes one "
                             f"as --baseline); expected {expects}")
    if not start.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip (before 1.6, a pickle)
        text = start and all(32 <= b < 127 or b in b"\t\n\r" for b in start)
        what_is = f"a text file (it begins {start.decode().splitlines()[0][:40]!r})" if text else \
            f"a file of another format (it begins {start[:8].hex(' ')})" if start else "empty"
        raise ModelFileError(f"{path}: {what_is}, not a {what}; expected {expects}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # a pickle that asks for code: never run it
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            asks = f" (it asks for {m.group(1)})" if m else ""
            raise ModelFileError(f"{path}: refused by the weights_only loader{asks}: a pickle "
                                 f"from another program or a tampered file; expected {expects}"
                                 ) from None
        raise ModelFileError(f"{path}: not a torch {what} ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 (truncated zip, bad records, ...: any failure is one line)
        raise ModelFileError(f"{path}: unreadable {what}, truncated or not a torch file "
                             f"({first_line(e)}); expected {expects}") from None
    if not isinstance(ck, dict) or "kind" not in ck:
        raise ModelFileError(f"{path}: no 'kind' field, not a cdeit-kit file "
                             f"(expected kind {kind!r})")
    if ck["kind"] != kind:
        hint = (hints or {}).get(ck["kind"], "")
        raise ModelFileError(f"{path}: kind {ck['kind']!r}, expected {kind!r}{hint}")
    if ck.get("version") != 1:
        raise ModelFileError(f"{path}: unsupported {kind} version {ck.get('version')!r} "
                             "(this kit reads 1)")
    missing = [k for k in fields if k not in ck]
    if missing:
        raise ModelFileError(f"{path}: {what} lacks the field(s) {', '.join(missing)}")
    return ck


def check_weights(sd, want, where):
    """Raise ModelFileError unless state dict sd has exactly want's keys and shapes; the one line
    (opened by `where`) names the missing, unexpected and mis-shaped keys, 8 of each at most."""
    if not isinstance(sd, dict):
        raise ModelFileError(f"{where}: not a state dict ({type(sd).__name__})")
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    misshaped = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}"
                       for k in set(sd) & set(want) if tuple(sd[k].shape) != tuple(want[k].shape))
    parts = [f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
             for label, keys in (("missing", missing), ("unexpected", unexpected),
                                 ("mis-shaped", misshaped)) if keys]
    if parts:
        raise ModelFileError(f"{where}: " + "; ".join(parts))


def load_student(path, hints=None):
    """A train.py checkpoint -> (model on CPU in eval mode, checkpoint dict without the optimizer).
    The one loader of a student: eval.py, predict.py and export.py all read checkpoints here."""
    fields = ("model_name", "model_args", "model", "data_args")
    ck = load_checked(path, "checkpoint", STUDENT_KIND, fields, hints)
    if ck["model_name"] not in ("vit", "deit", "cdeit"):
        raise ModelFileError(f"{path}: model_name {ck['model_name']!r} is not a student (vit, "
                             "deit, cdeit)")
    try:
        # an older file: the timm layout, as it was built
        ck["model_args"] = saved_model_args(ck["model_args"])
        net = create_model(ck["model_name"], **ck["model_args"])
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: model_args do not build a {ck['model_name']}: {e}") from None
    check_weights(ck["model"], net.state_dict(), f"{path}: weights do not fit the model")
    net.load_state_dict(ck["model"])
    ck.pop("optimizer", None)
    return net.eval(), ck


def temperature_path(ckpt_path):
    """The calibration sidecar of a checkpoint: best.pt -> best.pt.temperatures.json (the weights
    file itself is never rewritten)."""
    return f"{ckpt_path}.temperatures.json"


def load_temperatures(ckpt_path, num_types=None):
    """The temperatures eval.py --calibrate stored beside ckpt_path, or None when there are none.
    -> {"global": T, "per_type": [T per corruption type] or None, ...}. A sidecar that is damaged
    or was fitted on another checkpoint (its sha256 differs) is refused, never silently used."""
    import json
    import os

    import fileio  # the kit's one sha256 of a file
    path = temperature_path(ckpt_path)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            t = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a readable temperatures file "
                             f"({first_line(e)})") from None
    if not isinstance(t, dict) or t.get("kind") != TEMPERATURE_KIND or t.get("version") != 1:
        raise ModelFileError(f"{path}: not a temperatures file written by eval.py --calibrate "
                             f"(kind {TEMPERATURE_KIND!r})")

    def pos(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
    per = t.get("per_type")
    per_ok = per is None or (isinstance(per, list) and all(map(pos, per))
                             and (num_types is None or len(per) == num_types))
    if not pos(t.get("global")) or not per_ok:
        raise ModelFileError(f"{path}: 'global' must be a positive number and 'per_type' None or "
                             f"{num_types or 'one'} positive numbers per corruption type")
    if t.get("checkpoint_sha256") != fileio.sha256_file(ckpt_path):
        raise ModelFileError(f"{path}: fitted on another version of {ckpt_path} (sha256 "
                             f"differs); rerun eval.py {ckpt_path} --calibrate, or delete it")
    return t


class Deployed(nn.Module):
    """A student as a user runs it: uint8 RGB images (B, 3, H, W) in, normalisation and the
    eval-mode head averaging (thesis 3.3) built in. -> class logits (B, num_classes), and for
    CdeiT also the corruption logits (B, num_types). mean / std: the training normalisation
    (augment.MEAN / STD)."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net.eval()
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # x * 1/(255 std) - mean/std: augment.normalize's arithmetic, so the logits match it exactly
        self.register_buffer("scale", 1 / (255 * std))
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("shift", mean / std)

    def forward(self, images):
        out = self.net.forward_heads(images.float() * self.scale - self.shift)
        logits = self.net.average_heads(out)
        return logits if out.corr is None else (logits, out.corr)
