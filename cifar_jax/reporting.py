"""A run's results as files: curves, confusion matrix, misclassified images, Grad-CAM, REPORT.md.

``build_report(workdir)`` writes, into the workdir: ``curves.png``, ``confusion_matrix.png``,
``misclassified.png``, ``gradcam.png``, ``classification_reports.md`` (one per evaluated epoch) and
``REPORT.md`` tying them together. Every prediction in it comes from one
``inference.predict`` call, so the per-class table, the confusion matrix, the misclassified
grid and its heat maps describe the same predictor (with the run's test-time views).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cifar_jax import inference, viz
from cifar_jax.errors import UserError
from cifar_jax.files import atomic_paths

REPORT_FILES = ("curves.png", "confusion_matrix.png", "misclassified.png", "gradcam.png", "classification_reports.md", "model_summary.txt")


class ReportError(UserError):
    """A workdir with nothing to report."""


class Report(NamedTuple):
    """What ``build_report`` wrote and the predictions behind it."""

    path: Path  # REPORT.md
    predictions: inference.Predictions  # of the whole test set
    misclassified: np.ndarray  # indices drawn in the grids, highest loss first


def read_history(workdir) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` (empty if there is none)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    history = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = None
            why = e.msg
        else:
            why = "not a record with epoch, train_loss, train_accuracy, lr and epoch_time_s"
        if not (isinstance(record, dict) and all(k in record for k in ("epoch", "train_loss", "train_accuracy", "lr", "epoch_time_s"))):
            raise ReportError(f"{path} line {number} is damaged ({why}); run the training command again to rewrite it "
                              "from the checkpoints")
        history.append(record)
    return history


def class_report(labels, predictions, class_names) -> dict:
    """scikit-learn's ``classification_report`` as a dict: precision, recall, F1, support per class."""
    from sklearn.metrics import classification_report

    return classification_report(labels, predictions, labels=list(range(len(class_names))),
                                 target_names=list(class_names), output_dict=True, zero_division=0)


def format_class_report(report: dict, class_names) -> str:
    """The dict of ``class_report`` in scikit-learn's text layout (rendered from the dict, so it is computed once)."""
    width = max(len(n) for n in [*class_names, "weighted avg"])
    lines = [f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
    for name in class_names:
        r = report[name]
        lines.append(f"{name:>{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1-score']:>9.4f} {int(r['support']):>9}")
    support = int(report["macro avg"]["support"])
    lines += ["", f"{'accuracy':>{width}} {'':>9} {'':>9} {report['accuracy']:>9.4f} {support:>9}"]
    for name in ("macro avg", "weighted avg"):
        r = report[name]
        lines.append(f"{name:>{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1-score']:>9.4f} {int(r['support']):>9}")
    return "\n".join(lines)


def format_report_table(report: dict, class_names) -> str:
    """The dict of ``class_report`` as a markdown table."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name in [*class_names, "macro avg", "weighted avg"]:
        r = report[name]
        lines.append(f"| {name} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1-score']:.4f} | {int(r['support'])} |")
    lines.append(f"| accuracy | | | {report['accuracy']:.4f} | {int(report['macro avg']['support'])} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path) -> None:
    """Train/test loss and accuracy against epoch, side by side."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    tested = [r for r in history if "test_accuracy" in r]  # eval_every > 1: not every epoch is evaluated.
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot([r["epoch"] for r in tested], [r["test_loss"] for r in tested], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in history], "o-", label="train (augmented)")
    ax_acc.plot([r["epoch"] for r in tested], [100 * r["test_accuracy"] for r in tested], "s-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    viz.save_figure(fig, path, dpi=90, palette=False)


def plot_confusion(labels, predictions, class_names, path: Path) -> None:
    """scikit-learn's confusion matrix display, counts per (true, predicted) class."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(len(class_names))), display_labels=class_names,
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45,
    )
    ax.set_title("Confusion matrix (test set)")
    fig.tight_layout()
    viz.save_figure(fig, path, dpi=80, palette=False)


def environment() -> dict:
    """Versions and devices, for the record."""
    import flax
    import jax
    import optax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
        "cpu": f"{cpu}, {os.cpu_count()} cores",
    }


def build_report(workdir, data_path: str | None = None, num_images: int = 20, step="best", progress: bool = False) -> Report:
    """Writes every report file into ``workdir``; returns the ``Report``.

    ``data_path`` replaces the data path recorded in the run; ``progress`` shows tqdm bars.
    Raises ``ReportError``/``CheckpointError``/``DataError`` (one line) when something is missing.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ReportError(f"workdir {str(workdir)!r} does not exist")
    history = read_history(workdir)
    if not history:
        raise ReportError(f"{workdir / 'metrics.jsonl'} has no finished epoch to report")
    trained = inference.load_trained(workdir, step)
    ds = inference.load_run_data(trained, data_path)
    names = list(trained.class_names)

    files = ("curves.png", "confusion_matrix.png", "misclassified.png", "gradcam.png", "classification_reports.md",
             "REPORT.md")
    with atomic_paths(*(workdir / f for f in files)) as tmp:  # The report and its plots are replaced together.
        out = dict(zip(files, tmp))
        plot_curves(history, out["curves.png"])
        preds = inference.predict(trained, ds.test_images, ds.test_labels, progress=progress)
        plot_confusion(ds.test_labels, preds.predicted, names, out["confusion_matrix.png"])
        worst = inference.misclassified_by_loss(preds)[:num_images]
        if len(worst):
            images = ds.test_images[worst]
            expl = inference.explain(trained, images, preds.predicted[worst], method="gradcam", layer=trained.cam_layer)
            titles = _titles(preds, worst, names)
            viz.image_grid(out["misclassified.png"], images, titles, cols=5, title="Misclassified test images, highest loss first")
            viz.image_grid(out["gradcam.png"], images, titles, overlays=viz.explanation_pictures(images, expl), cols=5,
                           title=f"Grad-CAM ({trained.cam_layer}, predicted class) over misclassified test images")
        report = class_report(ds.test_labels, preds.predicted, names)
        per_epoch = [f"## Epoch {r['epoch']}\n\n" + format_report_table(r["classification_report"], names)
                     for r in history if "classification_report" in r]
        out["classification_reports.md"].write_text(
            "# Per-epoch classification reports (test set)\n\n" + "\n\n".join(per_epoch) + "\n")
        out["REPORT.md"].write_text(_report_text(trained, history, ds, preds, worst, report))
    return Report(workdir / "REPORT.md", preds, worst)


def _titles(preds, indices, names) -> list[str]:
    probs = preds.probabilities[indices]
    return [f"true: {names[y]}\npred: {names[int(p.argmax())]} {p.max():.2f}" for y, p in zip(preds.labels[indices], probs)]


def _report_text(trained, history, ds, preds, worst, report) -> str:
    config, names = trained.config, list(trained.class_names)
    best = max((r for r in history if "test_accuracy" in r), key=lambda r: r["test_accuracy"])
    final = history[-1]  # Always evaluated.
    total_time = sum(r["epoch_time_s"] for r in history)
    epochs = "\n".join(
        f"| {r['epoch']} | {r['train_loss']:.4f} | {100 * r['train_accuracy']:.2f} | "
        + (f"{r['test_loss']:.4f} | {100 * r['test_accuracy']:.2f} |" if "test_accuracy" in r else "- | - |")
        + f" {r['lr']:.4g} | {r['epoch_time_s']:.1f} |"
        for r in history
    )
    probs = preds.probabilities
    wrong_rows = "\n".join(
        f"| {i + 1} | {idx} | {names[preds.labels[idx]]} | {names[preds.predicted[idx]]} | {probs[idx].max():.3f} | {preds.losses[idx]:.3f} |"
        for i, idx in enumerate(worst)
    )
    ls = config.optim.label_smoothing
    smoothing_note = f" (the train loss is against labels smoothed by {ls:g}, so it sits above the test loss)" if ls else ""
    views = trained.describe_views()
    predictor = (f"the mean of the logits of its test-time views ({views}: `eval_flip`, `eval_translate`)" if views
                 else "the logits of each image")
    data_desc = getattr(ds, "description", None) or (
        f"image folder `{Path(config.data.path).name}`" if config.data.source == "folder" else f"`{config.data.source}` {config.data.name}"
    )
    config_lines = json.dumps(config.to_dict(), indent=1, sort_keys=True)
    every = config.get("eval_every", 1)
    every_note = f" The test set was evaluated every {every} epochs and after the last (`eval_every`)." if every > 1 else ""
    measured = next((r for r in history if r.get("step") == trained.step and "test_accuracy" in r), None)
    correct = int((preds.predicted == preds.labels).sum())
    if measured is not None and round(measured["test_accuracy"] * len(preds.labels)) != correct:
        every_note += (f"\n\n**Recomputed here, step {trained.step} scores {100 * preds.accuracy:.2f}%, not the "
                       f"{100 * measured['test_accuracy']:.2f}% training measured**: other data or convolution kernels "
                       "than in training (e.g. the report built on another machine).")
    return f"""# Training report: {config.model.name} width {config.model.width}

Data: {data_desc}, {len(ds.train_labels)} training and {len(ds.test_labels)} test images, {len(names)} classes.
Model step {trained.step} ({"best by test accuracy" if trained.step == best.get("step") else "as asked"}) is used for the confusion matrix, the per-class table and the pictures;
its predictions are {predictor}. It misclassifies {int((preds.predicted != preds.labels).sum())} of {len(preds.labels)} test images.

| | test accuracy | epoch |
|---|---:|---:|
| best | **{100 * best['test_accuracy']:.2f}%** | {best['epoch']} |
| final | {100 * final['test_accuracy']:.2f}% | {final['epoch']} |

Training time: {total_time / 60:.1f} min for {len(history)} epochs ({total_time / len(history):.0f} s per epoch on average, test evaluation included).{every_note}

## Curves

![loss and accuracy](curves.png)

## Per-class results (step {trained.step})

{format_report_table(report, names)}

![confusion matrix](confusion_matrix.png)

## Misclassified test images and Grad-CAM

The {len(worst)} misclassified test images with the highest loss, and Grad-CAM at {trained.cam_layer} for the predicted class
(red = regions that raised the predicted class's logit).

![misclassified](misclassified.png)

![Grad-CAM](gradcam.png)

| # | test index | true | predicted | p(predicted) | loss |
|---:|---:|---|---|---:|---:|
{wrong_rows}

## Per epoch

| epoch | train loss | train acc (%) | test loss | test acc (%) | last lr | time (s) |
|---:|---:|---:|---:|---:|---:|---:|
{epochs}

Train loss and accuracy are running means over the augmented batches of the epoch{smoothing_note}. Per-epoch classification reports:
[classification_reports.md](classification_reports.md). Model summary: [model_summary.txt](model_summary.txt).

## Environment

{chr(10).join(f'- {k}: {v}' for k, v in environment().items())}

## Config

```json
{config_lines}
```
"""
