import json

from PIL import Image

from cifar_jax.report import main
from cifar_jax.reporting import REPORT_FILES


def test_training_writes_a_complete_report(smoke_workdir):
    for name in (*REPORT_FILES, "REPORT.md", "metrics.jsonl"):
        assert (smoke_workdir / name).exists(), name
    for name in ("curves.png", "confusion_matrix.png", "misclassified.png", "gradcam.png"):
        image = Image.open(smoke_workdir / name)
        assert image.size[0] >= 600 and (smoke_workdir / name).stat().st_size < 300_000, name
    text = (smoke_workdir / "REPORT.md").read_text()
    history = [json.loads(l) for l in (smoke_workdir / "metrics.jsonl").read_text().splitlines()]
    best = max(r["test_accuracy"] for r in history)
    assert f"**{100 * best:.2f}%**" in text
    for part in ("## Curves", "## Per-class results", "| airplane |", "confusion_matrix.png", "misclassified.png",
                 "gradcam.png", "## Per epoch", "## Environment", "- jax: ", "- flax: ", "## Config", "s per epoch"):
        assert part in text, part
    reports = (smoke_workdir / "classification_reports.md").read_text()
    assert reports.count("## Epoch") == len(history) and "| truck |" in reports


def test_report_cli_rebuilds_on_demand(smoke_workdir, capsys):
    (smoke_workdir / "REPORT.md").unlink()
    (smoke_workdir / "curves.png").unlink()
    assert main(["--workdir", str(smoke_workdir), "--num", "5"]) == 0
    assert (smoke_workdir / "REPORT.md").exists() and (smoke_workdir / "curves.png").exists()
    assert "Report written to" in capsys.readouterr().out


def test_report_of_a_missing_workdir_says_it_does_not_exist(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path / "typo")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: workdir {str(tmp_path / 'typo')!r} does not exist"


def test_report_of_an_empty_workdir_is_a_one_line_error(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "REPORT.md").exists()


def report_numbers(text: str) -> dict:
    """The accuracies REPORT.md states: summary best/final (%), per-class table, misclassified count."""
    import re

    wrong, total = map(int, re.search(r"misclassifies (\d+) of (\d+) test images", text).groups())
    return {
        "best": float(re.search(r"\| best \| \*\*([\d.]+)%\*\*", text)[1]) / 100,
        "final": float(re.search(r"\| final \| ([\d.]+)%", text)[1]) / 100,
        "table": float(re.search(r"^\| accuracy \| \| \| ([\d.]+) \|", text, re.M)[1]),
        "counted": (total - wrong) / total,
        "step": int(re.search(r"Model step (\d+)", text)[1]),
    }


def test_bfloat16_report_states_one_accuracy_that_matches_metrics(cifar_archive, tmp_path):
    """bfloat16 with 2000 test images: close calls that other convolution kernels decide differently."""
    from cifar_jax import train

    workdir = tmp_path / "bf16"
    assert train.main(["--config", "experiments/smoke.py", "--workdir", str(workdir), f"--config.data.path={cifar_archive}",
                       "--config.model.dtype=bfloat16", "--config.data.max_test=2000",
                       "--config.log.progress_bar=false"]) == 0
    numbers = report_numbers((workdir / "REPORT.md").read_text())
    history = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in history if "test_accuracy" in r), key=lambda r: r["test_accuracy"])
    assert numbers["step"] == best["step"]
    assert numbers["best"] == round(best["test_accuracy"], 4)
    assert numbers["final"] == round(history[-1]["test_accuracy"], 4)
    assert numbers["table"] == round(best["test_accuracy"], 4)
    assert numbers["counted"] == best["test_accuracy"]
    assert "Recomputed here" not in (workdir / "REPORT.md").read_text()
