"""reproduce.py end to end on --dataset synthetic on the CPU: Table 3, 2 seeds, a tiny student.

One module fixture plays a user's session once: a --dry-run; a first invocation killed (SIGKILL to
its whole process group) while its second run trains; one later run interrupted mid-epoch through
train.py's own stop path (what SIGTERM leaves: ckpt.pt at epoch 0, step 5), started from the exact
command the dry run printed; a second invocation, two runs at once (--gpus 0,0 on the CPU: two
runs share one id), that must skip the finished run, resume the interrupted one and finish the
set; a third that must train nothing. The tests then check each step and the written mean ± std
against the per-run JSON files.
"""
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest

import metrics
import reproduce
import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--train-per-class", "2",
        "--val-per-class", "1", "--test-per-class", "2", "--head-epochs", "1", "--batch-size", "16"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
NAMES = [f"{c}-s{s}" for c in reproduce.TABLE3 for s in (0, 1)]


def cli(d):
    return ["table3", "--seeds", "0", "1", "--dataset", "synthetic", "--device", "cpu",
            "--data-dir", str(d / "data"), "--out", str(d / "res")]


def run(cmd, timeout, **kw):
    """cmd in the repository root; its exit status is asserted by the caller."""
    kw = {"cwd": ROOT, "env": ENV, **kw}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def reproduce_cmd(d, *more):
    return [sys.executable, "reproduce.py"] + cli(d) + list(more) + ["--"] + TINY


@pytest.fixture(scope="module")
def session(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("repro")
    runs = d / "res" / "runs" / "paper-synthetic"
    t0 = time.time()
    out = {"dir": d, "runs": runs}
    dry = run(reproduce_cmd(d, "--dry-run"), 60)
    out["dry"] = dry

    # 1. killed while its second run trains
    p = subprocess.Popen(reproduce_cmd(d), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    lines, deadline = [], time.time() + 300
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "2/10 started" in line:
            time.sleep(1.0)
            break
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and its train.py, as a preemption would
    except ProcessLookupError:
        pass  # it ended early: the assertions on its output say why
    p.wait()
    out["killed"] = "".join(lines)

    # 2. run 4 (deit-hard s1) stopped mid-epoch by train.py's stop path, from the dry run's command
    import train
    cmd = next(shlex.split(ln) for ln in dry.stdout.splitlines()
               if "train.py" in ln and "--model deit --distill hard" in ln and "--seed 1" in ln)
    assert cmd[:2] == [sys.executable, reproduce.TRAIN]
    out["stopped"] = train.main(cmd[2:], stop_at_step=5)

    # 3. the same command again, two runs at a time: finishes the set
    out["second"] = run(reproduce_cmd(d, "--gpus", "0,0"), 600)
    out["mtimes"] = {n: os.path.getmtime(runs / n / "train.log") for n in NAMES
                     if (runs / n / "train.log").exists()}
    # 4. and once more: nothing to train
    out["third"] = run(reproduce_cmd(d, "--no-plots"), 120)
    out["seconds"] = time.time() - t0
    print(f"reproduce session: {out['seconds']:.0f}s")
    return out


def test_dry_run_prints_the_exact_commands(session):
    d, out = session["dir"], session["dry"].stdout
    assert session["dry"].returncode == 0, session["dry"].stderr
    lines = out.splitlines()
    assert sum("train.py" in ln for ln in lines) == 10
    assert sum("eval.py" in ln for ln in lines) == 10
    run_dir = str(d / "res" / "runs" / "paper-synthetic" / "vit-none-s0")
    want = [sys.executable, reproduce.TRAIN, "--model", "vit", "--distill", "none", "--split",
            "paper", "--seed", "0", "--dataset", "synthetic"] + TINY
    want += ["--out-dir", run_dir, "--device", "cpu", "--data-dir", str(d / "data")]
    assert shlex.join(want) in lines
    assert shlex.join([sys.executable, reproduce.EVAL, run_dir + "/best.pt", "--json",
                       run_dir + "/eval.json", "--device", "cpu"]) in lines


def test_kill_then_rerun_finishes_the_set_with_the_interrupted_run_resumed(session):
    runs, second = session["runs"], session["second"]
    assert "1/10 finished vit-none s0" in session["killed"] and "2/10 started" in session["killed"]
    assert session["stopped"] == 0
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    so = second.stdout
    assert "1/10 skip vit-none s0" in so  # finished before the kill
    assert "4/10 started deit-hard s1 (resume with --resume + eval)" in so
    assert "resumed " in (runs / "deit-hard-s1" / "train.log").read_text()
    assert "epoch 0, step 5" in (runs / "deit-hard-s1" / "train.log").read_text()
    assert len(re.findall(r"\d+/10 finished ", so)) == 9 and "FAILED" not in so
    for n in NAMES:
        assert (runs / n / "eval.json").exists() and (runs / n / "train.log").exists(), n
        assert json.loads((runs / n / "config.json").read_text())["environment"]["torch"]


def test_second_invocation_trains_nothing(session):
    third, runs = session["third"], session["runs"]
    assert third.returncode == 0, third.stderr
    assert "started" not in third.stdout and "nothing to run" in third.stdout
    assert third.stdout.count(" skip ") == 10
    assert {n: os.path.getmtime(runs / n / "train.log") for n in NAMES} == session["mtimes"]


def test_written_mean_std_equal_the_per_run_json(session):
    res_dir, runs = session["dir"] / "res", session["runs"]
    res = json.loads((res_dir / "table3.json").read_text())
    md = (res_dir / "table3.md").read_text()
    assert [r["config"] for r in res["rows"]] == reproduce.TABLE3
    for row in res["rows"]:
        evals = [json.loads((runs / f"{row['config']}-s{s}" / "eval.json").read_text())
                 for s in (0, 1)]
        bases = [json.loads((runs / f"vit-none-s{s}" / "eval.json").read_text()) for s in (0, 1)]
        mine = {m: [e[m] for e in evals] for m in ("accuracy", "ece", "nll", "clean_error")}
        mine["mce"] = [e["mce"] for e in evals]  # the CIFAR-10-C convention: no baseline model
        mine["mce_vs_baseline"] = [metrics.mce(e["corruption_errors"], b["corruption_errors"])
                                   for e, b in zip(evals, bases)]
        md_row = next(ln for ln in md.splitlines() if ln.startswith(f"| {row['config']} | 2 |"))
        for m, vals in mine.items():
            scale = results.METRICS[m][1]
            xs = [scale * v for v in vals]
            cell = row["metrics"][m]
            where = (row["config"], m)
            assert cell["n"] == 2, where
            assert cell["mean"] == pytest.approx(statistics.mean(xs), abs=1e-12), where
            assert cell["std"] == pytest.approx(statistics.stdev(xs), abs=1e-12), (row["config"], m)
            d = 4 if scale == 1 else 2
            want = f"{statistics.mean(xs):.{d}f} ± {statistics.stdev(xs):.{d}f} (2)"
            assert want in md_row, where
        rel = row["metrics"]["relative_mce"]
        why = [metrics.relative_mce_undefined(b["corruption_errors"], b["clean_error"])
               for b in bases]
        why = why[0] or why[1]
        assert (rel.get("undefined") is not None) == (why is not None)
    deit = next(r for r in res["rows"] if r["config"] == "deit-soft")["metrics"]["mce"]
    assert deit["thesis"]["value"] == 0.46
    assert deit["thesis"]["diff"] == pytest.approx(deit["mean"] - 0.46)
    assert "vit-none run of the same seed" in md and "SYNTHETIC" in md
    assert len(res["runs"]) == 10
    assert all(r["environment"]["git_commit"] is not None for r in res["runs"])


def test_refuses_to_average_runs_whose_configs_differ(session, capsys):
    cfg = session["runs"] / "cdeit-soft-s1" / "config.json"
    text = cfg.read_text()
    try:
        c = json.loads(text)
        c["lr"] *= 2
        cfg.write_text(json.dumps(c))
        argv = cli(session["dir"]) + ["--task", "aggregate", "--no-plots", "--"] + TINY
        assert reproduce.main(argv) == 2
        err = capsys.readouterr().err
        assert "differ in more than the seed (lr:" in err and "refusing to average" in err
    finally:
        cfg.write_text(text)


def test_slurm_script_checks_and_runs_its_tasks_in_turn(session, tmp_path):
    d = session["dir"]
    script = tmp_path / "table3.sbatch"
    shutil.rmtree(d / "res" / "slurm", ignore_errors=True)
    argv = cli(d) + ["--no-plots", "--gpus", "0,1", "--slurm", str(script), "--"] + TINY
    assert reproduce.main(argv) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-9" in text and "--task" in text
    assert (d / "res" / "slurm").is_dir()  # Slurm opens each task's --output before the script runs
    assert "--gpus" not in text  # a task uses the GPU Slurm gives it, not the ids given here
    assert run(["bash", "-n", str(script)], 60).returncode == 0
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM")}
    r = run(["bash", str(script)], 300, cwd=None, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tasks = [(c, s) for c in reproduce.TABLE3 for s in (0, 1)]
    order = [r.stdout.index(f"task {i}: {c} s{s}") for i, (c, s) in enumerate(tasks)]
    assert order == sorted(order) and "started" not in r.stdout
    assert r.stdout.index("task 9:") < r.stdout.index("wrote ")
    one = run(["bash", str(script)], 120, cwd=None, env=dict(env, SLURM_ARRAY_TASK_ID="3"))
    assert one.returncode == 0 and "task 3: deit-hard s1" in one.stdout
    assert "task 2:" not in one.stdout
    assert "wrote " not in one.stdout  # the aggregation is its own step


def test_relative_mce_undefined_when_the_baseline_does_not_degrade(capsys):
    import eval as ev
    import tables
    base = {"fog": [0.01, 0.02, 0.01, 0.02, 0.01], "snow": [0.3, 0.4, 0.5, 0.6, 0.7]}
    # the thesis's regime for fog: clean 0.25, corrupted < 0.02
    why = metrics.relative_mce_undefined(base, 0.25)
    assert why is not None and "fog" in why and "1 of 2" in why and "snow" not in why
    assert metrics.relative_mce_undefined({"snow": base["snow"]}, 0.25) is None
    assert metrics.relative_mce({"fog": [0.1] * 5}, 0.2, base, 0.25) != metrics.relative_mce(
        {"fog": [0.1] * 5}, 0.2, base, 0.25)  # nan, never a negative percentage
    r = {"corruption_errors": {"fog": [0.1] * 5, "snow": [0.5] * 5}, "clean_error": 0.2}
    ev.add_mce(r, {"corruption_errors": base, "clean_error": 0.25}, "vit.json")
    assert r["relative_mce"] is None and r["relative_mce_undefined"] == why
    assert r["mce_vs_baseline"] > 0
    assert tables.rel_mce_text(r).startswith(
        "undefined (the baseline's corrupted error is not above")


def test_sigterm_mid_run_then_rerun_resumes_it(session, tmp_path):
    """A real stop in the middle of a run: SIGTERM to the driver while train.py is past its first
    epoch (of 10) goes on to train.py, which saves where it is; the same command again resumes it.
    The teacher experiment, on the session's data (its teacher cache is reused)."""
    cmd = [sys.executable, "reproduce.py", "teacher", "--seeds", "0", "--dataset", "synthetic",
           "--device", "cpu", "--data-dir", str(session["dir"] / "data"), "--out", str(tmp_path),
           "--no-plots", "--"] + TINY + ["--epochs", "10"]
    log = tmp_path / "runs" / "paper-synthetic" / "deit-hard-s0" / "train.log"
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "epoch 1/10" in log.read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    first = p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in first, first
    assert "stopped (SIGTERM)" in log.read_text()
    r = run(cmd, 300)
    resumed = "1/1 started deit-hard s0 (resume with --resume + eval)"
    assert r.returncode == 0 and resumed in r.stdout, r.stdout + r.stderr
    assert "resumed " in log.read_text() and "epoch 10/10" in log.read_text()
    res = json.loads((tmp_path / "teacher.json").read_text())
    cell = res["rows"][0]["metrics"]["teacher_test_accuracy"]
    test = json.loads((log.parent / "teacher-test.json").read_text())
    assert cell["mean"] == pytest.approx(100 * test["accuracy"]) and cell["thesis"]["value"] == 87.4

