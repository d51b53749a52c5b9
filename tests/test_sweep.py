"""python -m cifar_jax.sweep at smoke size (variants side by side, one table, finished runs reused); its summary over seeds."""

import json
import sys
import time

import pytest

from cifar_jax.sweep import SweepError, format_table, load_variants, run_jobs, summarize
from tests.conftest import run_module

SMALL = ["--set", "epochs=1", "--set", "data.max_train=256", "--set", "data.max_test=128"]


def test_sweep_trains_variants_and_prints_one_table_then_reuses_finished_runs(cifar_archive, tmp_path):
    root = tmp_path / "sweep"
    variants = tmp_path / "variants.py"
    variants.write_text("def get_variants():\n    return {'base': [], 'no_cutout': ['augment.cutout=0']}\n")
    cmd = ["cifar_jax.sweep", "--config", "experiments/smoke.py", "--workdir", str(root), "--variants", str(variants),
           "--seeds", "1", "--set", f"data.path={cifar_archive}", *SMALL]  # Not the default seed 0: it is passed on.
    result = run_module(*cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((root / "sweep.json").read_text())}
    assert list(rows) == ["base", "no_cutout"]
    for name, row in rows.items():
        assert row["seeds"] == [1] and not row["failed"]
        assert 0 <= row["min"] == row["mean"] <= 100 and row["std"] == 0 and row["epoch_s"] > 0 and row["total_s"] > 0
        config = json.loads((root / name / "seed1" / "config.json").read_text())
        assert config["seed"] == 1 and config["epochs"] == 1 and config["log"]["report"] is False
        assert config["augment"]["cutout"] == (0 if name == "no_cutout" else 8)
    # The header and one row per variant; a rerun finds every run finished, trains nothing and prints the same table.
    table = [l for l in result.stdout.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + 2 and "| no_cutout | 1 |" in table[2] and "augment.cutout=0" in table[2]
    again = run_module(*cmd)
    assert again.returncode == 0 and "0 run(s) to train" in again.stdout
    assert [l for l in again.stdout.splitlines() if l.startswith("| ")] == table


def test_a_row_summarizes_its_seeds_and_counts_failed_runs(tmp_path):
    def job(variant, seed, accuracy):
        result = None if accuracy is None else {
            "test_accuracy": accuracy, "single_view": accuracy - 0.01, "epoch_s": 2.0 + seed, "total_s": 10.0 * (seed + 1)}
        return {"variant": variant, "seed": seed, "workdir": tmp_path / variant / f"seed{seed}", "rc": 1, "result": result}

    jobs = [job("a", 0, 0.90), job("b", 0, None), job("a", 1, 0.92), job("b", 1, 0.80), job("a", 2, 0.94)]
    a, b = summarize({"a": [], "b": ["augment.cutout=0"]}, jobs)
    assert a["seeds"] == [0, 1, 2] and a["failed"] == [] and a["accuracy"] == pytest.approx([90, 92, 94])
    assert (a["mean"], a["std"], a["min"]) == pytest.approx((92, 2, 90))
    assert (a["single_mean"], a["single_std"]) == pytest.approx((91, 2))
    assert (a["epoch_s"], a["total_s"]) == (3.0, 20.0)  # The median epoch; the mean time to result.
    assert b["seeds"] == [1] and b["failed"] == [{"seed": 0, "rc": 1, "log": str(tmp_path / "b" / "seed0") + ".log"}]
    assert (b["mean"], b["std"]) == pytest.approx((80, 0))
    lines = format_table([a, b]).splitlines()
    assert lines[2] == "| a | 3 | 92.00 ± 2.00 | 90.00 | 91.00 ± 2.00 | 3.00 | 20 | (config as is) |"
    assert lines[3].startswith("| b | 1 (1 failed) | 80.00 ± 0.00 |") and lines[3].endswith("| augment.cutout=0 |")
    assert format_table([{**b, "mean": None}]).splitlines()[2].count("failed") == 6


def test_sweep_refuses_a_bad_variants_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_variants():\n    return ['not', 'a', 'dict']\n")
    for args in (["--variants", str(bad)], ["--variants", str(tmp_path / "missing.py")], ["--variant", "nameonly"], []):
        result = run_module("cifar_jax.sweep", "--config", "experiments/smoke.py", "--workdir", str(tmp_path / "w"), *args)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(err) == 1 and err[0].startswith("error: "), result.stderr
    assert not (tmp_path / "w").exists()


def test_only_picks_variants_in_order_and_names_a_missing_one(tmp_path):
    variants = tmp_path / "v.py"
    variants.write_text("def get_variants():\n    return {'a': ['x=1'], 'b': [], 'c': ['y=2']}\n")
    assert load_variants(str(variants), [], ["c", "a"]) == {"c": ["y=2"], "a": ["x=1"]}
    with pytest.raises(SweepError, match="--only d: no such variant; the variants are a, b, c"):
        load_variants(str(variants), [], ["a", "d"])


def test_runs_past_the_deadline_are_stopped_then_killed_and_later_ones_never_start(tmp_path):
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    jobs = [{"workdir": tmp_path / f"run{i}", "cmd": [sys.executable, "-c", ignores_term]} for i in range(3)]
    start = time.time()
    run_jobs(jobs, parallel=2, memory_fraction=0.5, deadline=start + 1.0, grace=1.0)
    assert time.time() - start < 10  # Not the 60 s the runs would take: SIGTERM at 1 s, SIGKILL at 2 s.
    assert [j["rc"] for j in jobs[:2]] == [-9, -9] and "proc" not in jobs[2]
