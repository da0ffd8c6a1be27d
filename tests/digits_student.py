"""A tiny CdeiT trained on real images, for the tests of the kit's users (predict.py, export.py,
calibration, RobustBench output).

The images are scikit-learn's handwritten digits written as CIFAR-10 / CIFAR-10-C files
(tests/conftest.py's `digits_files`). The model trains in this process on the thesis's mix of them
(thesis Eq. 6 through losses.distillation_loss, the true label standing in for the teacher's hard
label: no teacher stage) and is saved in train.py's checkpoint format once per test session.
"""
import torch
import torch.nn.functional as F

import augment
import data
import losses
import model as model_lib

MIX = {"split": "paper", "seed": 0, "train_per_class": 10, "val_per_class": 20,
       "test_per_class": 20}
ARGS = {"depth": 2, "num_heads": 2, "embed_dim": 64, "patch_size": 8}

_trained = {}  # data folder -> checkpoint path, shared by the test files of one session


def train_digits_cdeit(root, seed=0, epochs=15):
    """A CdeiT of 2 blocks (patch 8: 16 patches) on the digits mix (11 types), AdamW, no
    augmentation. -> the model in eval mode (test accuracy about 0.96, type accuracy about 0.45)."""
    torch.manual_seed(seed)
    train = data.build_mix(root, **MIX)["train"]
    net = model_lib.create_model("cdeit", **ARGS)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(train["labels"]), generator=g).split(64):
            y = train["labels"][idx]
            out = net.train()(augment.normalize(train["images"][idx]))
            hard = F.one_hot(y, 10).float()
            loss, _ = losses.distillation_loss(out, y, hard, train["types"][idx], distill="hard")
            loss.backward()
            opt.step()
            opt.zero_grad()
    return net.eval()


def save_ckpt(path, net, name, root):
    """train.py's checkpoint fields (what model.load_student reads)."""
    torch.save({"kind": model_lib.STUDENT_KIND, "version": 1, "model_name": name,
                "model_args": dict(ARGS, layout="thesis"), "model": net.state_dict(),
                "config": {"model": name, "distill": "hard"}, "epoch": 1,
                "data_args": dict(root=str(root), **MIX), "dataset": "cifar"}, path)


def trained_checkpoint(root, tmp_path_factory):
    """The checkpoint of the CdeiT trained on the digits in root, trained once per session. A test
    that writes beside it (eval.py --calibrate) copies it first."""
    if root not in _trained:
        ckpt = tmp_path_factory.mktemp("student") / "cdeit.pt"
        save_ckpt(ckpt, train_digits_cdeit(root), "cdeit", root)
        _trained[root] = ckpt
    return _trained[root]
