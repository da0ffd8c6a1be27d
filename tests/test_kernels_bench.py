"""kernels/bench.py's GPU-free parts on CPU: the GPU benchmark's code paths at toy sizes (timings
stubbed), bench/gpu.sh's summary lines and results.json, and the --overhead section."""
import importlib
import json

import pytest
import torch

bench = importlib.import_module("kernels.bench")
K = importlib.import_module("kernels.distill_loss")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not K.INTERPRETED:
    pytest.skip("no CUDA and TRITON_INTERPRET=1 was not set before triton was imported",
                allow_module_level=True)


def test_gpu_benchmark_code_runs_at_toy_sizes(monkeypatch):
    """Every impl and goal name of the GPU benchmark, on CPU at toy shapes with one untimed call
    per measurement; the timings mean nothing, the rows and goals must all appear."""
    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    monkeypatch.setattr(bench, "TRAIN", (None, 3, 67, 32))
    monkeypatch.setattr(bench, "TEACHER", (1, 2, 197, 32))
    monkeypatch.setattr(bench, "BATCHES", (2, 1))
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), (1.0, 1.0))[1])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # inductor on CPU is minutes
    # bench_loss raises the recompile limit; restored by hand, not by monkeypatch: pytest 9.2's undo
    # deletes a torch config entry (it looks unset), which breaks later torch.compile calls
    limit = torch._dynamo.config.recompile_limit
    try:
        rows, goals = bench.bench_attention(torch.float16)
        loss_rows, loss_goals = bench.bench_loss(torch.float32)
    finally:
        torch._dynamo.config.recompile_limit = limit
    bench.print_table(rows + loss_rows)
    names = set(goals) | set(loss_goals)
    assert {f"{g} {mode}".replace("B1024", "B2")
            for g in bench.GOALS for mode in ("eager", "graph")} <= names
    impls = {r["impl"] for r in rows}
    assert {"triton", "triton packed layer", "sdpa packed layer (model, kernels off)", "sdpa[math]",
            "fastest sdpa"} <= impls
    assert {r["shape"] for r in rows} == {"B2 H3 N67 D32", "B1 H3 N67 D32", "B1 H2 N197 D32"}
    assert len(loss_rows) == (5 + 1) * 3


def _goals(**values):
    return bench.print_goals({f"{g} {mode}": values.get(g.split()[0], 2.0) * bench.GOALS[g]
                              for g in bench.GOALS for mode in ("eager", "graph")})


def _junit(tests, failures, skipped):
    return ('<testsuites><testsuite name="pytest" '
            f'tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}"/></testsuites>')


def test_gpu_summary_lines_and_json(tmp_path, capsys):
    """bench/gpu.sh's last step, on made-up results: a line per test step and per goal."""
    (tmp_path / "tests_kernels.xml").write_text(_junit(5, 0, 1))
    (tmp_path / "tests_compiled_step.xml").write_text(_junit(1, 1, 0))
    (tmp_path / "kernels_bench.json").write_text(json.dumps({"rows": [],
                                                             "goals": _goals(loss=0.5)}))
    (tmp_path / "steps.tsv").write_text("tests_kernels\t0\t12\t70\nbench_train\t124\t40\t40\n")
    assert bench.summarize(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "FAIL step_bench_train timed out after 40 s in 40 s finishes within 40 s" in out
    results = json.loads((tmp_path / "results.json").read_text())
    got = {g["name"]: g["status"] for g in results["goals"]}
    assert got["tests kernels"] == "PASS" and got["tests compiled_step"] == "FAIL"
    assert got["attention kernel vs fastest SDPA B1024 graph"] == "PASS"
    assert got["loss vs eager B1024 eager"] == "FAIL"
    assert len(got) == 2 + 2 + 2 * len(bench.GOALS) and got["step tests_kernels"] == "PASS"
    (tmp_path / "tests_compiled_step.xml").unlink()
    (tmp_path / "steps.tsv").unlink()
    (tmp_path / "kernels_bench.json").write_text(json.dumps({"rows": [], "goals": _goals()}))
    assert bench.summarize(str(tmp_path)) == 0  # everything passed
    (tmp_path / "kernels_bench.json").write_text(json.dumps({"rows": [], "goals": _goals()[1:]}))
    assert bench.summarize(str(tmp_path)) == 1  # a goal with no measurement is a FAIL
    (tmp_path / "kernels_bench.json").unlink()
    assert bench.summarize(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert ("FAIL attention_kernel_vs_fastest_SDPA_B1024_eager no result "
            "(no kernels_bench*.json)") in out
    parts = _goals()  # the two halves of a `--only attention` / `--only loss` pair of runs
    for name, goals in (("attention", parts[:4]), ("loss", parts[4:])):
        (tmp_path / f"kernels_bench_{name}.json").write_text(json.dumps({"rows": [],
                                                                         "goals": goals}))
    assert bench.summarize(str(tmp_path)) == 0


def test_summary_without_a_gpu_says_skip(tmp_path, capsys):
    """On a machine with no GPU every line is SKIP (nothing measured), and the exit status is 1."""
    (tmp_path / "tests_kernels.xml").write_text(_junit(3, 0, 3))
    (tmp_path / "kernels_bench.json").write_text(json.dumps({"skipped": "no CUDA GPU", "rows": [],
                                                             "goals": []}))
    assert bench.summarize(str(tmp_path)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 2 * len(bench.GOALS)
    assert all(line.startswith("SKIP ") for line in lines)


def test_overhead_rows(monkeypatch):
    """--overhead's code path, a few calls each: our rows really launch (stubbed) Triton kernels."""
    monkeypatch.setattr(bench, "_per_call_us", lambda fn: (fn(), (1.0, 1.0))[1])
    n = torch.get_num_threads()
    rows = bench.overhead_rows()
    torch.set_num_threads(n)
    launches = {(r["what"], r["impl"]): r["launches"] for r in rows}
    assert launches[("loss cdeit soft", "ours")] == 3  # rows forward, sum, rows backward
    assert all(v > 0 for (what, impl), v in launches.items() if impl == "ours")
    assert all(v == 0 for (what, impl), v in launches.items() if impl != "ours")


def test_per_test_timeout_option(tmp_path):
    """tests/conftest.py's --test-timeout (bench/gpu.sh's per-test limit without pytest-timeout):
    the slow test fails with a TimeoutError, the next test still runs and passes."""
    import os
    import subprocess
    import sys
    (tmp_path / "test_probe.py").write_text("import time\n\ndef test_slow():\n"
                                            "    time.sleep(30)\n\n"
                                            "def test_next():\n    pass\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "conftest", "--test-timeout", "1", str(tmp_path / "test_probe.py")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
                       check=False)
    assert "1 failed, 1 passed" in r.stdout, r.stdout[-2000:]
    assert "ran past --test-timeout 1 s" in r.stdout, r.stdout[-2000:]
