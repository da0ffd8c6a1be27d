"""results.py without runs: eval.json's mCE of every generation, mean ± std, and a table of an
experiment nothing has run for yet (reproduce.py's files end to end: tests/test_reproduce.py)."""
import argparse
import math

import pytest

import reproduce
import results


def test_headline_mce_reads_every_eval_json_generation():
    """eval.json's mCE (mean corruption error, no baseline): "mce" now; files written before it
    was the only key hold it as "mean_corruption_error", the oldest with "mce" = Eq. 10."""
    assert results.headline_mce({"mce": 0.25}) == 0.25
    assert results.headline_mce({"mean_corruption_error": 0.25, "mce": 0.25}) == 0.25
    assert results.headline_mce({"mean_corruption_error": 0.25, "mce": 1.1}) == 0.25
    assert results.headline_mce({"accuracy": 0.9}) is None


def test_mean_std_is_the_sample_std_over_the_numbers():
    mean, std, n = results.mean_std([1.0, None, 3.0, math.nan])
    assert (mean, n) == (2.0, 2) and std == pytest.approx(math.sqrt(2))
    assert results.mean_std([5.0]) == (5.0, None, 1)
    assert results.mean_std([None]) == (None, None, 0)


def test_a_table_without_runs_shows_the_thesis_and_no_number():
    args = argparse.Namespace(split="paper", dataset=None, seeds=[0, 1], extra=[])
    e = reproduce.EXPERIMENTS["table2"]
    res = results.aggregate("table2", e, reproduce.CONFIGS, [], args)
    assert [r["config"] for r in res["rows"]] == e["configs"]
    assert all(r["n"] == 0 for r in res["rows"])
    md = results.render_md(res)
    assert "| deit-hard | 0 | - | 96.7 (-) | - |" in md
    assert "Thesis sources: thesis Table 2." in md and "SYNTHETIC" not in md
