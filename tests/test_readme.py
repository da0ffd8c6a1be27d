"""The front page's commands, pasted in order into a fresh copy of the repository, run: README.md's
```bash blocks are run one after another, each as one bash script (`set -e`) in that copy, and each
must exit 0. A line (or a block's first line) whose comment says `needs: REASON, ...` is skipped,
with its reason: REASONS lists the words the page may use, so a typo cannot skip a command."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a skipped command needs that a test run does not have
REASONS = {"network", "data", "gpu", "8 gpus", "slurm", "images", "suite"}
# what a user's run leaves in the tree (.gitignore): not copied, as a fresh clone has none of it
NOT_COPIED = {".git", "data", "out", "results", "runs", "cache", "__pycache__", ".pytest_cache"}


def bash_blocks(text):
    """[(line number, [lines])] of every ```bash block, in order."""
    blocks, block, start = [], None, 0
    for i, line in enumerate(text.splitlines(), 1):
        if block is None and line.strip() == "```bash":
            block, start = [], i + 1
        elif block is not None and line.strip() == "```":
            blocks.append((start, block))
            block = None
        elif block is not None:
            block.append(line)
    assert block is None, f"README.md: the ```bash block at line {start} is not closed"
    return blocks


def needs(line):
    """The reasons a `# ...needs: a, b` comment gives ([] when none); unknown words fail."""
    m = re.search(r"#[^'\"]*\bneeds: ([^#]+)$", line)
    if not m:
        return []
    words = [w.strip() for w in m.group(1).split(",")]
    assert set(words) <= REASONS, f"unknown needs {set(words) - REASONS} in: {line}"
    return words


def runnable(lines):
    """(script, skipped) of one block: the lines to run, and (line, reasons) of those left out."""
    if lines and lines[0].lstrip().startswith("#") and needs(lines[0]):
        return "", [(ln, needs(lines[0])) for ln in lines]
    keep, skipped = [], []
    for ln in lines:
        if needs(ln):
            skipped.append((ln, needs(ln)))
        else:
            keep.append(ln)
    return "\n".join(keep), skipped


def fresh_copy(dest):
    """The repository's files as a fresh clone has them: git's tracked and untracked-but-not-ignored
    files when git can list them, else the tree without what runs leave behind."""
    try:
        cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        listed = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n in NOT_COPIED])
        return
    for f in filter(None, listed.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def run_blocks(text, cwd, timeout=600):
    """Run every block's runnable lines in order; return the skipped (line, reasons). A block that
    exits non-zero fails the test with its command and the tail of its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    skipped = []
    for start, lines in bash_blocks(text):
        script, left = runnable(lines)
        skipped += left
        if not script.strip():
            continue
        r = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            pytest.fail(f"README.md block at line {start} exited {r.returncode}:\n{script}\n"
                        f"--- stdout (tail)\n{r.stdout[-2000:]}\n"
                        f"--- stderr (tail)\n{r.stderr[-3000:]}")
    return skipped


def test_front_page_commands_run_in_order(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    fresh_copy(tmp_path)
    skipped = run_blocks(text, tmp_path)
    for line, reasons in skipped:
        print(f"skipped ({', '.join(reasons)}): {line.strip()}")
    skipped_cmds = {re.sub(r"\s+", " ", ln.split("#")[0].strip()) for ln, _ in skipped}
    # the set-up and test lines (.ci/run's) are on the page and never run from here
    ci = {"pip install -r requirements.txt -r requirements-test.txt", "python -m pytest -q"}
    assert ci <= skipped_cmds
    # the chain the page promises: Try it now's checkpoint, then what the next section wrote
    run = tmp_path / "out" / "cdeit-hard-paper-s0-synthetic"
    assert (run / "best.pt.temperatures.json").is_file()
    for f in ("eval.json", "preds.csv", "cdeit.onnx", "cdeit.pt"):
        assert (tmp_path / f).is_file(), f


def test_a_failing_block_fails_the_test(tmp_path):
    """The runner above can fail: a command that exits 2 (a checkpoint that was never written)
    fails it, with that command and its error in the message, and the block stops there."""
    missing = tmp_path / "out" / "best.pt"
    page = f"```bash\necho ok\n```\n\n```bash\npython eval.py {missing}\ntouch reached\n```\n"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)line 6 exited 2:.*stderr.*not found"):
        run_blocks(page, ROOT, timeout=120)
    assert not os.path.exists(os.path.join(ROOT, "reached"))


def test_needs_markers():
    """A marked line is left out with its reasons, a marked first line leaves out the block, an
    unknown reason is an error (it would skip a command by a typo)."""
    script, skipped = runnable(["a  # needs: data, 8 gpus", "b  # a comment", "c"])
    assert script == "b  # a comment\nc"
    assert skipped == [("a  # needs: data, 8 gpus", ["data", "8 gpus"])]
    script, skipped = runnable(["# needs: slurm", "sbatch x", "y"])
    assert script == "" and [s[0] for s in skipped] == ["# needs: slurm", "sbatch x", "y"]
    with pytest.raises(AssertionError, match="gpuz"):
        runnable(["a  # needs: gpuz"])


def test_front_page_links_resolve():
    """Every relative link on the front page names a file or folder of the repository."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", f.read())
    local = [ln for ln in links if "://" not in ln]
    assert "docs/recipe.md" in local
    missing = [ln for ln in local if not os.path.exists(os.path.join(ROOT, ln))]
    assert not missing, f"README.md links to files that do not exist: {missing}"
