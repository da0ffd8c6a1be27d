"""Export a trained student for deployment: ONNX, and TorchScript.

    python export.py out/cdeit-hard-paper-s0/best.pt --onnx cdeit.onnx [--torchscript cdeit.pt]

The exported model is model.Deployed: input `images`, uint8 RGB (B, 3, 32, 32) (any batch size),
with the training normalisation (augment.MEAN / STD) and the strategy's eval-mode head averaging
(thesis 3.3) inside. Outputs: `class_logits` (B, 10); CdeiT also `corruption_logits` (B, 11, the
types of data.TYPES, clean first). Softmax and the calibration temperatures
(CKPT.temperatures.json from eval.py --calibrate) stay outside: logits / T, then softmax.

Attention is exported through PyTorch's SDPA path (kernels.sdpa_packed), never the Triton kernel:
the model is exported on the CPU, where model.py does not call Triton. Opset 17, through
torch.onnx's TorchScript-based exporter (dynamo=False: the dynamo exporter needs onnxscript).
Each export is checked before it is written: the exported model is run on a batch and must match
PyTorch's eval logits (ONNX through onnxruntime when it is installed).
"""
import io
import sys
import warnings

import torch

import augment
import fileio
import model as model_lib
from cli import FlagError, Parser, check_writable_file

OPSET = 17
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """A bad option or a failed export; the message names it."""


def deployed(ckpt_path):
    """The checkpoint as model.Deployed on the CPU, attention through SDPA."""
    net, _ = model_lib.load_student(ckpt_path)
    for m in net.modules():  # the PyTorch attention path, whatever device it later runs on
        if isinstance(m, model_lib.Attention):
            m.fused_attn = False
    return model_lib.Deployed(net.cpu(), augment.MEAN, augment.STD).eval()


def reference(dep, images):
    """PyTorch's eval logits for uint8 images: the model's own eval forward on augment.normalize,
    plus the corruption logits for CdeiT (the numbers an export must reproduce)."""
    with torch.no_grad():
        x = augment.normalize(images)
        out = [dep.net(x)]
        if dep.net.head_corr is not None:
            out.append(dep.net.forward_heads(x).corr)
    return [o.numpy() for o in out]


def output_names(dep):
    return ["class_logits"] + (["corruption_logits"] if dep.net.head_corr is not None else [])


def to_onnx(dep, example):
    """-> the ONNX file's bytes (dynamic batch axis)."""
    names = output_names(dep)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(dep, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["images"] + names})
    return buf.getvalue()


def run_onnx(blob, images):
    import onnxruntime as ort
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": images.numpy()})


def to_torchscript(dep, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.trace(dep, (example,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(ts, buf)
    return buf.getvalue()


def load_torchscript(blob):
    with warnings.catch_warnings():  # torch.jit's deprecation note
        warnings.simplefilter("ignore")
        return torch.jit.load(io.BytesIO(blob))


def check(name, got, want):
    """Every output within TOLERANCE of PyTorch's eval logits, or ExportError."""
    if len(got) != len(want):
        raise ExportError(f"{name}: {len(got)} outputs, PyTorch's eval gives {len(want)}")
    for n, g, w in zip(["class_logits", "corruption_logits"], got, want, strict=False):
        err = float(abs(g - w).max())
        if not err <= TOLERANCE:
            raise ExportError(f"{name}: {n} differ from PyTorch's eval logits by {err:.2e} "
                              f"(> {TOLERANCE})")


def main(argv=None):
    p = Parser(prog="export.py", description="Export a trained student (normalisation and head "
                                             "averaging inside).")
    p.add_argument("checkpoint", help="a student checkpoint (train.py's best.pt / ckpt.pt)")
    p.add_argument("--onnx", help="write the ONNX model here")
    p.add_argument("--torchscript", help="write a traced TorchScript model here (torch.jit.load)")
    args = p.parse_args(argv)
    try:
        if not args.onnx and not args.torchscript:
            raise ExportError("give --onnx FILE and/or --torchscript FILE")
        for flag, out in (("--onnx", args.onnx), ("--torchscript", args.torchscript)):
            if out:
                check_writable_file(flag, out)
        dep = deployed(args.checkpoint)
        g = torch.Generator().manual_seed(0)
        example = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
        batch = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)  # other B
        want = reference(dep, batch)
        outputs = []
        if args.onnx:
            blob = to_onnx(dep, example)
            try:
                check(args.onnx, run_onnx(blob, batch), want)
                how = "matches PyTorch through onnxruntime"
            except ImportError:
                how = "unchecked: onnxruntime is not installed"
            outputs.append((args.onnx, blob, f"ONNX model ({how})"))
        if args.torchscript:
            blob = to_torchscript(dep, example)
            ts = load_torchscript(blob)
            with torch.no_grad():
                got = ts(batch)
            got = [o.numpy() for o in (got if isinstance(got, tuple) else (got,))]
            check(args.torchscript, got, want)
            outputs.append((args.torchscript, blob, "TorchScript model (matches PyTorch)"))
        for path, blob, what in outputs:
            fileio.atomic_write(path, blob, what)
            print(f"wrote {path}: {what}; input images uint8 (B, 3, 32, 32), outputs "
                  f"{', '.join(output_names(dep))}")
        return 0
    except (ExportError, FlagError, model_lib.ModelFileError, OSError) as e:
        print("export.py: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
