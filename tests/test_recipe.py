"""The README's recipe table against train.py's parser: every default in the table is the one
`train.py` uses, and every recipe flag has a row, so the two cannot drift apart. No torch work."""
import os
import re

import pytest

import train
from augment import Augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# flags whose defaults make the seed's recipe; each needs a row in the table
RECIPE_FLAGS = {"mixup", "mixup_prob", "cutmix", "cutmix_prob", "mix_types", "randaug", "randaug_prob",
                "erase_prob", "erase_mode", "draw_per", "crop_padding", "hflip", "teacher_view",
                "teacher_resize", "vit_head", "smoothing", "drop_path", "drop", "epochs", "batch_size",
                "lr", "weight_decay", "warmup_epochs", "opt", "tau", "alpha", "strategy"}


def _recipe_table():
    """{dest: default cell} from the README's "## Recipe" section's table."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"^## Recipe.*?\n(\|.*?)(?:\n\n|\Z)", text, flags=re.S | re.M)
    assert m, "README.md has no '## Recipe' section with a table"
    lines = m.group(1).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == \
        ["setting", "default", "seed's value", "seed's source", "flag"]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, line
        flag = re.search(r"--([a-z][a-z-]*)", cells[4])
        assert flag, f"recipe row without a flag: {line}"
        dest = flag.group(1).replace("-", "_")
        assert dest not in rows, f"two rows for --{flag.group(1)}"
        rows[dest] = cells[1]
    return rows


def _value(cell):
    """The default cell's first word: on / off, a number, or a choice."""
    word = cell.split()[0].strip("`")
    if word in ("on", "off"):
        return word == "on"
    for cast in (int, float):
        try:
            return cast(word)
        except ValueError:
            pass
    return word


def test_readme_recipe_table_matches_train_defaults():
    rows, args = _recipe_table(), train.get_args([])
    assert RECIPE_FLAGS <= set(rows), f"flags missing from the README recipe table: {RECIPE_FLAGS - set(rows)}"
    for dest, cell in rows.items():
        assert hasattr(args, dest), f"README recipe row for --{dest}, which train.py does not have"
        want, got = _value(cell), getattr(args, dest)
        assert type(got) is not bool or type(want) is bool, (dest, cell)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, \
            f"--{dest}: train.py's default is {got!r}, the README's table says {cell!r}"


def test_augment_defaults_are_train_defaults():
    """augment.Augment() alone (a user copying augment.py) gives the same recipe as train.py."""
    args, aug = train.get_args([]), Augment()
    assert (aug.mixup_alpha, aug.mixup_prob) == (args.mixup, args.mixup_prob)
    assert (aug.cutmix_alpha, aug.cutmix_prob, aug.mix_types) == (args.cutmix, args.cutmix_prob, args.mix_types)
    assert (aug.erase_prob, aug.erase_mode, aug.randaug_prob) == (args.erase_prob, args.erase_mode, args.randaug_prob)
    assert (aug.crop_padding, aug.flip, aug.per_batch) == (args.crop_padding, args.hflip, args.draw_per == "batch")
    assert aug.randaug_ops == (2 if args.randaug else 0)


def test_table_parser_catches_a_drift(monkeypatch):
    """A changed default must fail the comparison (the test above can fail)."""
    real = train.get_args
    monkeypatch.setattr(train, "get_args", lambda argv=None: real(["--mixup-prob", "0.5"]))
    with pytest.raises(AssertionError, match="mixup_prob"):
        test_readme_recipe_table_matches_train_defaults()
