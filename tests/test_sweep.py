"""python -m cifar_jax.sweep at smoke size: variants x seeds side by side, one table, finished runs reused."""

import json

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
