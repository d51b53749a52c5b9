"""Results of a run as files: ``python -m cifar_jax.report --workdir DIR``.

Writes into DIR: ``curves.png`` (loss and accuracy per epoch), ``confusion_matrix.png``,
``misclassified.png``, ``gradcam.png``, ``classification_reports.md`` (one per epoch)
and ``REPORT.md`` tying them together with the config, best and final test
accuracy, the per-class table, time per epoch and the environment. Training
calls this at the end; run it by hand to rebuild the report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

REPORT_FILES = ("curves.png", "confusion_matrix.png", "misclassified.png", "gradcam.png", "classification_reports.md", "model_summary.txt")


def read_history(workdir: Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl``."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(history: list[dict], path: Path) -> None:
    """Train/test loss and accuracy against epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in history], "o-", label="train (augmented)")
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in history], "s-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusion(labels, predictions, class_names, path: Path) -> None:
    """scikit-learn's confusion matrix display, counts per (true, predicted) class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(len(class_names))), display_labels=class_names,
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45,
    )
    ax.set_title("Confusion matrix (test set)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def predict(trained, images, batch: int = 1000) -> np.ndarray:
    """(M,) predicted classes of uint8 test images with the trained model (flip-averaged if it was trained so)."""
    import jax

    @jax.jit
    def logits(variables, x):
        out = trained.model.apply(variables, _norm(trained, x), train=False)
        if trained.config.get("eval_flip", False):
            out = 0.5 * (out + trained.model.apply(variables, _norm(trained, x[:, :, ::-1]), train=False))
        return out

    return np.concatenate([np.asarray(logits(trained.variables, images[s : s + batch])).argmax(-1) for s in range(0, len(images), batch)])


def _norm(trained, x):
    from cifar_jax.augment import normalize

    return normalize(x, trained.mean, trained.std)


def format_report_table(report: dict, class_names) -> str:
    """A markdown table of a classification_report dict (precision, recall, F1, support per class)."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name in [*class_names, "macro avg", "weighted avg"]:
        r = report[name]
        lines.append(f"| {name} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1-score']:.4f} | {int(r['support'])} |")
    lines.append(f"| accuracy | | | {report['accuracy']:.4f} | {int(report['macro avg']['support'])} |")
    return "\n".join(lines)


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
    import os

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
        "cpu": f"{cpu}, {os.cpu_count()} cores",
    }


def build_report(workdir, data_path: str | None = None, num_images: int = 20, step="best") -> Path:
    """Writes every report file into ``workdir`` and returns the path of REPORT.md."""
    from sklearn.metrics import classification_report

    from cifar_jax import viz
    from cifar_jax.checkpoints import load_trained
    from cifar_jax.data import DataError, load_dataset
    from cifar_jax.explain import explain_maps, misclassified_by_loss

    workdir = Path(workdir)
    history = read_history(workdir)
    if not history:
        raise DataError(f"{workdir / 'metrics.jsonl'} has no finished epoch to report")
    trained = load_trained(workdir, step)
    config = trained.config
    if data_path:
        config.data.path = data_path
    if config.data.source == "folder" and not Path(config.data.path).exists():
        raise DataError(f"test data {config.data.path!r} not found; pass --data PATH")
    ds = load_dataset(config.data)
    names = list(trained.class_names)

    plot_curves(history, workdir / "curves.png")
    predictions = predict(trained, ds.test_images)
    plot_confusion(ds.test_labels, predictions, names, workdir / "confusion_matrix.png")
    worst = misclassified_by_loss(trained, ds.test_images, ds.test_labels)[:num_images]
    if len(worst):
        images, labels = ds.test_images[worst], ds.test_labels[worst]
        maps, _, probs, _ = explain_maps(trained, images, None, method="gradcam", layer="layer4")
        titles = [f"true: {names[y]}\npred: {names[int(p.argmax())]} {p.max():.2f}" for y, p in zip(labels, probs)]
        overlays = np.stack([viz.heatmap_overlay(i, m) for i, m in zip(images, maps)])
        viz.image_grid(workdir / "misclassified.png", images, titles, cols=5, title="Misclassified test images, highest loss first")
        viz.image_grid(workdir / "gradcam.png", images, titles, overlays=overlays, cols=5,
                       title="Grad-CAM (layer4, predicted class) over misclassified test images")
    report = classification_report(ds.test_labels, predictions, labels=list(range(len(names))),
                                   target_names=names, output_dict=True, zero_division=0)
    per_epoch = [f"## Epoch {r['epoch']}\n\n" + format_report_table(r["classification_report"], names) for r in history]
    (workdir / "classification_reports.md").write_text("# Per-epoch classification reports (test set)\n\n" + "\n\n".join(per_epoch) + "\n")

    best = max(history, key=lambda r: r["test_accuracy"])
    final = history[-1]
    env = environment()
    total_time = sum(r["epoch_time_s"] for r in history)
    times = "\n".join(
        f"| {r['epoch']} | {r['train_loss']:.4f} | {100 * r['train_accuracy']:.2f} | {r['test_loss']:.4f} | "
        f"{100 * r['test_accuracy']:.2f} | {r['lr']:.4g} | {r['epoch_time_s']:.1f} |"
        for r in history
    )
    config_lines = json.dumps(config.to_dict(), indent=1, sort_keys=True)
    ls = config.optim.label_smoothing
    smoothing_note = f" (the train loss is against labels smoothed by {ls:g}, so it sits above the test loss)" if ls else ""
    data_desc = (
        f"image folder `{Path(config.data.path).name}`" if config.data.source == "folder" else f"tfds `{config.data.name}`"
    )
    text = f"""# Training report: {config.model.name} width {config.model.width}

Data: {data_desc}, {len(ds.train_labels) if config.data.max_train == 0 else config.data.max_train} training and {len(ds.test_labels)} test images, {len(names)} classes.
Model step {trained.step} (best by test accuracy) is used for the confusion matrix, the per-class table and the pictures.

| | test accuracy | epoch |
|---|---:|---:|
| best | **{100 * best['test_accuracy']:.2f}%** | {best['epoch']} |
| final | {100 * final['test_accuracy']:.2f}% | {final['epoch']} |

Training time: {total_time / 60:.1f} min for {len(history)} epochs ({total_time / len(history):.0f} s per epoch on average, test evaluation included).

## Curves

![loss and accuracy](curves.png)

## Per-class results (step {trained.step})

{format_report_table(report, names)}

![confusion matrix](confusion_matrix.png)

## Misclassified test images and Grad-CAM

The {len(worst)} misclassified test images with the highest loss, and Grad-CAM at layer4 for the predicted class
(red = regions that raised the predicted class's logit).

![misclassified](misclassified.png)

![Grad-CAM](gradcam.png)

## Per epoch

| epoch | train loss | train acc (%) | test loss | test acc (%) | last lr | time (s) |
|---:|---:|---:|---:|---:|---:|---:|
{times}

Train loss and accuracy are running means over the augmented batches of the epoch{smoothing_note}. Per-epoch classification reports:
[classification_reports.md](classification_reports.md). Model summary: [model_summary.txt](model_summary.txt).

## Environment

{chr(10).join(f'- {k}: {v}' for k, v in env.items())}

## Config

```json
{config_lines}
```
"""
    (workdir / "REPORT.md").write_text(text)
    return workdir / "REPORT.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cifar_jax.report", description="Build REPORT.md and plots for a training workdir.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", help="data path, if not the one the model was trained with")
    p.add_argument("--num", type=int, default=20, help="misclassified images in the grids (default 20)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from cifar_jax.checkpoints import CheckpointError
    from cifar_jax.data import DataError
    from cifar_jax.train import quiet_library_logs

    quiet_library_logs()
    try:
        path = build_report(args.workdir, args.data, args.num)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
