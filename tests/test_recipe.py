"""docs/recipe.md's table against train.py's parser: every default in the table is the one
`train.py` uses, and every recipe flag (and every fixed deviation) has a row, so the two cannot
drift apart; and the schedule the table names. No torch work."""
import os
import re

import pytest

import train
from augment import Augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "docs", "recipe.md")

# flags whose defaults make the thesis's recipe; each needs a row in the table
RECIPE_FLAGS = {"mixup", "mixup_prob", "cutmix", "cutmix_prob", "mix_types", "randaug",
                "randaug_prob", "erase_prob", "erase_mode", "draw_per", "crop_padding", "hflip",
                "teacher_view", "teacher_resize", "layout", "smoothing", "drop_path", "drop",
                "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "lr_per", "min_lr",
                "amp", "opt", "tau", "alpha", "strategy"}
# deviations without a flag (flag cell "none: why"); each needs a row too
FIXED_ROWS = {"vit baseline head", "checkpoint selection", "teacher head fit", "teacher precision",
              "patch size", "`PatchEmbedding` erase_prob"}


def _recipe_table(fixed=None):
    """{dest: default cell} from docs/recipe.md's first table; rows whose flag cell starts with
    "none" go to `fixed` ({setting: default cell}) instead."""
    with open(RECIPE, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^(\|.*?)(?:\n\n|\Z)", text, flags=re.DOTALL | re.MULTILINE)
    assert m, "docs/recipe.md has no table"
    lines = m.group(1).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == \
        ["setting", "default", "the thesis", "source", "flag"]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, line
        if cells[4].startswith("none"):
            assert cells[4].startswith("none: ") and fixed is not None, \
                f"a fixed row says why: {line}"
            fixed[cells[0]] = cells[1]
            continue
        flag = re.search(r"--([a-z][a-z-]*)", cells[4])
        assert flag, f"recipe row without a flag: {line}"
        dest = flag.group(1).replace("-", "_")
        assert dest not in rows, f"two rows for --{flag.group(1)}"
        rows[dest] = cells[1]
    return rows


def _value(cell):
    """The default cell's first word: on / off, a number, a choice, or auto (decided at run time:
    None in the parser)."""
    word = cell.split()[0].strip("`:")
    if word in ("on", "off"):
        return word == "on"
    if word == "auto":
        return None
    for cast in (int, float):
        try:
            return cast(word)
        except ValueError:
            pass
    return word


def test_recipe_table_matches_train_defaults():
    fixed = {}
    rows, args = _recipe_table(fixed), train.get_args([])
    assert RECIPE_FLAGS <= set(rows), f"flags without a recipe row: {RECIPE_FLAGS - set(rows)}"
    assert FIXED_ROWS <= set(fixed), f"fixed rows missing: {FIXED_ROWS - set(fixed)}"
    for dest, cell in rows.items():
        assert hasattr(args, dest), f"a recipe row for --{dest}, which train.py does not have"
        want, got = _value(cell), getattr(args, dest)
        assert type(got) is not bool or type(want) is bool, (dest, cell)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, \
            f"--{dest}: train.py's default is {got!r}, docs/recipe.md says {cell!r}"


def test_augment_defaults_are_train_defaults():
    """augment.Augment() alone (a user copying augment.py) gives the same recipe as train.py."""
    args, aug = train.get_args([]), Augment()
    assert (aug.mixup_alpha, aug.mixup_prob) == (args.mixup, args.mixup_prob)
    assert (aug.cutmix_alpha, aug.cutmix_prob, aug.mix_types) == \
        (args.cutmix, args.cutmix_prob, args.mix_types)
    assert (aug.erase_prob, aug.erase_mode, aug.randaug_prob) == \
        (args.erase_prob, args.erase_mode, args.randaug_prob)
    assert (aug.crop_padding, aug.flip, aug.per_batch) == \
        (args.crop_padding, args.hflip, args.draw_per == "batch")
    assert aug.randaug_ops == (2 if args.randaug else 0)


def test_table_parser_catches_a_drift(monkeypatch):
    """A changed default must fail the comparison (the test above can fail)."""
    real = train.get_args
    monkeypatch.setattr(train, "get_args", lambda argv=None: real(["--mixup-prob", "0.5"]))
    with pytest.raises(AssertionError, match="mixup_prob"):
        test_recipe_table_matches_train_defaults()


def test_schedule_steps_per_epoch_by_default():
    """--lr-per epoch (the thesis's trainers: scheduler.step() after each epoch): one lr per
    epoch, linear warmup over whole epochs, then cosine; --lr-per step moves every step."""
    args = train.get_args(["--epochs", "5", "--warmup-epochs", "2", "--min-lr", "0"])
    assert args.lr_per == "epoch"
    lr = train.lr_schedule(args, spe=10, peak=1.0)
    per_epoch = [[lr(e * 10 + i) for i in range(10)] for e in range(5)]
    assert all(len(set(e)) == 1 for e in per_epoch)  # constant within each epoch
    # warmup over epochs 0..1, then cosine over epochs 2..4
    assert [e[0] for e in per_epoch] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.25])
    args.lr_per = "step"
    lr = train.lr_schedule(args, spe=10, peak=1.0)
    assert lr(0) == pytest.approx(1 / 20) and lr(1) > lr(0) and lr(25) > lr(26) > lr(49) >= 0
