"""python -m cifar_jax.sweep at smoke size: variants x seeds side by side, one table, finished runs reused."""

import json
import sys
import time

import pytest

from cifar_jax.sweep import SweepError, load_variants, run_jobs
from tests.conftest import run_module

SMALL = ["--set", "epochs=1", "--set", "data.max_train=256", "--set", "data.max_test=128"]


def test_sweep_trains_variants_and_seeds_and_prints_one_table(cifar_archive, tmp_path):
    root = tmp_path / "sweep"
    variants = tmp_path / "variants.py"
    variants.write_text("def get_variants():\n    return {'base': [], 'no_cutout': ['augment.cutout=0']}\n")
    cmd = ["cifar_jax.sweep", "--config", "experiments/smoke.py", "--workdir", str(root), "--variants", str(variants),
           "--seeds", "0", "1", "--set", f"data.path={cifar_archive}", *SMALL]
    result = run_module(*cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((root / "sweep.json").read_text())}
    assert list(rows) == ["base", "no_cutout"]
    for name, row in rows.items():
        assert row["seeds"] == [0, 1] and not row["failed"]
        assert 0 <= row["min"] <= row["mean"] <= 100 and row["std"] >= 0 and row["epoch_s"] > 0 and row["total_s"] > 0
        for seed in (0, 1):
            config = json.loads((root / name / f"seed{seed}" / "config.json").read_text())
            assert config["seed"] == seed and config["epochs"] == 1 and config["log"]["report"] is False
            assert config["augment"]["cutout"] == (0 if name == "no_cutout" else 8)
    # The header and one row per variant; a rerun finds every run finished, trains nothing and prints the same table.
    table = [l for l in result.stdout.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + 2 and "| no_cutout | 2 |" in table[2] and "augment.cutout=0" in table[2]
    again = run_module(*cmd)
    assert again.returncode == 0 and "0 run(s) to train" in again.stdout
    assert [l for l in again.stdout.splitlines() if l.startswith("| ")] == table


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
