"""Command-line checks shared by train.py, eval.py and reproduce.py: every flag is refused right
after parsing, before any file is read or written, with one line that names the flag, the value and
what is allowed.

A flag's range is its argparse `type` (`a("--mixup-prob", type=probability)`): argparse reports a
bad value as "argument --mixup-prob: 2 is not a probability in [0, 1]", and `Parser.error` prints
that as one line (no usage block) and exits 2. Checks that involve several flags, a device or a
path live in each entry point's check function and raise `FlagError`, printed the same way.
"""

import argparse
import math
import os
import re
import sys


class FlagError(ValueError):
    """A flag's value (or a combination of flags) that is not allowed; printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and help that shows each flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    # True: error() raises FlagError (reproduce.py checks train.py's flags this way)
    raise_errors = False

    def error(self, message):
        if self.raise_errors:
            raise FlagError(message)
        # under torchrun every rank parses the same flags: one copy of the line is enough
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and adds "(default: X)" to every flag whose default is
    not None (a None default is explained by the flag's own help) and not already shown."""

    def _get_help_string(self, action):
        h = action.help or ""
        if (
            "%(default)" in h
            or action.default in (None, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return h
        if isinstance(action.default, bool) and action.nargs == 0 and not action.default:
            return h  # a plain switch: off unless given
        return f"{h} (default: %(default)s)"


def fail(flag, value, allowed):
    """The one-line refusal for a flag: `--flag value: allowed`."""
    raise FlagError(f"{flag} {value}: {allowed}" if value != "" else f"{flag}: {allowed}")


# ----------------------------------------------------------------------------- value types


def _number(kind, text):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return v


def bounded(kind, lo=None, hi=None, lo_open=False, hi_open=False, what=None):
    """An argparse type: a finite int or float in [lo, hi] (open ends where asked)."""
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    if lo is not None and hi is not None:
        span = f"in {left}{lo}, {hi}{right}"
    elif lo is not None:
        span = f"{'>' if lo_open else '>='} {lo}"
    else:
        span = f"{'<' if hi_open else '<='} {hi}"
    desc = what or f"a {'number' if kind is float else 'whole number'} {span}"

    def parse(text):
        v = _number(kind, text)
        low = lo is not None and (v <= lo if lo_open else v < lo)
        if low or (hi is not None and (v >= hi if hi_open else v > hi)):
            raise argparse.ArgumentTypeError(f"{text} is not {desc}")
        return v

    parse.__name__ = desc  # argparse names the type in its own messages
    return parse


positive_int = bounded(int, 1)
non_negative_int = bounded(int, 0)
positive = bounded(float, 0, lo_open=True)
non_negative = bounded(float, 0)
probability = bounded(float, 0, 1, what="a probability in [0, 1]")
# dropout, drop-path, label smoothing: 1 would erase everything
rate = bounded(float, 0, 1, hi_open=True)

seed_int = bounded(int, 0, 2**32 - 1, what="a seed in [0, 2^32 - 1]")


def url(text):
    if not re.match(r"^(https?|file)://\S+$", text):
        raise argparse.ArgumentTypeError(f"{text} is not a URL (http://, https:// or file://)")
    return text


def gpu_list(text):
    """--gpus 0,1,3: CUDA device ids (one may repeat: two runs share that GPU)."""
    if not re.match(r"^\d+(,\d+)*$", text.replace(" ", "")):
        raise argparse.ArgumentTypeError(
            f"{text} is not a comma-separated list of GPU ids, e.g. 0,1,2,3"
        )
    return text.replace(" ", "")


# ----------------------------------------------------------------------------- devices and paths


def check_device(flag, name, gpus_needed=()):
    """`--device` must be cpu, cuda or cuda:N of this machine (torch imported only here)."""
    if name is None:
        return
    m = re.match(r"^(cpu|cuda)(?::(\d+))?$", name)
    if not m or (m.group(1) == "cpu" and m.group(2)):
        fail(flag, name, "not a device this kit runs on (cpu, cuda or cuda:N)")
    if m.group(1) == "cuda":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            fail(flag, name, "no CUDA device is available on this machine (use --device cpu)")
        if m.group(2) is not None and int(m.group(2)) >= n:
            fail(flag, name, f"this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")


def check_writable_dir(flag, path):
    """A folder that exists and can be written, or one that can be created (its nearest existing
    parent is a writable folder); nothing is created here."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        fail(flag, path, "is a file, not a folder")
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not os.path.isdir(p):
        fail(flag, path, f"cannot be created: {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        fail(flag, path, f"cannot be written: {p} is not writable")


def check_writable_file(flag, path):
    """An output file: its folder exists and is writable, and it is not a folder itself."""
    if os.path.isdir(path):
        fail(flag, path, "is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(flag, path, f"its folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.W_OK)
    ):
        fail(flag, path, f"cannot be written ({folder} or the file is read-only)")


def check_existing_file(flag, path):
    if path is not None and not os.path.isfile(path):
        fail(flag, path, "is a folder, not a file" if os.path.isdir(path) else "no such file")


def check_existing_dir(flag, path):
    if path is not None and not os.path.isdir(path):
        fail(flag, path, "is a file, not a folder" if os.path.exists(path) else "no such folder")
