"""Explain a trained model's predictions: ``python -m cifar_jax.explain --workdir DIR``.

Default: the ``--num`` misclassified test images with the highest loss, as one
grid PNG (image, true and predicted class, heat-map overlay) plus one overlay
per image. ``--images PATH...`` explains your own images of any size and
format instead and prints the top-3 classes. ``--evaluate`` scores the CAM
methods' faithfulness on test images (see ``cifar_jax.faithfulness``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

GUIDED = ("guided-gradcam", "guided-backprop")


class ExplainError(ValueError):
    """Bad arguments or inputs (one-line message)."""


def parse_args(argv):
    from cifar_jax.cam import CAM_LAYERS, METHODS

    p = argparse.ArgumentParser(prog="python -m cifar_jax.explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir with checkpoints")
    p.add_argument("--images", nargs="+", metavar="PATH", help="explain these image files instead of test images")
    p.add_argument("--method", default="gradcam", choices=[*METHODS, *GUIDED], help="CAM method (default gradcam)")
    p.add_argument("--layer", default="layer4", help=f"stage to explain: {', '.join(CAM_LAYERS)} (default layer4)")
    p.add_argument("--target", help="class name or index to explain (default: the predicted class)")
    p.add_argument("--num", type=int, default=20, help="misclassified test images to show (default 20)")
    p.add_argument("--out", help="output folder (default DIR/explain)")
    p.add_argument("--step", default="best", help="checkpoint: best, latest or a step number (default best)")
    p.add_argument("--data", help="data path, if not the one the model was trained with")
    p.add_argument("--aug-smooth", action="store_true", help="average with the map of the mirrored image")
    p.add_argument("--eigen-smooth", action="store_true", help="first principal component of the weighted activations")
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity in overlays (default 0.5)")
    p.add_argument("--evaluate", action="store_true", help="score every CAM method's faithfulness and write a table")
    p.add_argument("--eval-images", type=int, default=1000, help="test images for --evaluate (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of random baselines and randomisation (default 0)")
    p.add_argument("--methods", nargs="+", help="CAM methods for --evaluate (default: all but scorecam)")
    return p.parse_args(argv)


def resolve_target(target: str | None, class_names) -> int | None:
    """A class index from a name or number; None stays None. Raises ExplainError."""
    if target is None:
        return None
    if target in class_names:
        return class_names.index(target)
    if target.lstrip("-").isdigit() and 0 <= int(target) < len(class_names):
        return int(target)
    raise ExplainError(f"unknown class {target!r}; choose a name ({', '.join(class_names)}) or 0..{len(class_names) - 1}")


def explain_maps(trained, images_uint8, target, *, method, layer, aug_smooth=False, eigen_smooth=False):
    """CAM maps (N, H, W) in [0, 1], targets (N,) and probabilities (N, C) for uint8 images at model size."""
    import jax

    from cifar_jax.augment import normalize
    from cifar_jax.cam import compute_cams, guided_backprop, guided_grad_cam

    x = normalize(images_uint8, trained.mean, trained.std)
    cam_method = "gradcam" if method in GUIDED else method
    cams = compute_cams(
        trained.model, trained.variables, x, target, method=cam_method, layer=layer,
        aug_smooth=aug_smooth, eigen_smooth=eigen_smooth,
    )
    probs = jax.nn.softmax(cams.logits, -1)
    guided = None
    if method == "guided-gradcam":
        guided = guided_grad_cam(trained.model, trained.variables, x, cams.targets, layer=layer)
    elif method == "guided-backprop":
        guided = guided_backprop(trained.model, trained.variables, x, cams.targets)
    return np.asarray(cams.maps), np.asarray(cams.targets), np.asarray(probs), None if guided is None else np.asarray(guided)


def _method_label(method: str) -> str:
    return {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "hirescam": "HiResCAM",
            "layercam": "LayerCAM", "scorecam": "Score-CAM", "eigencam": "EigenCAM",
            "guided-gradcam": "Guided Grad-CAM", "guided-backprop": "Guided backprop"}[method]


def _guided_pictures(guided):
    from cifar_jax.cam import deprocess_gradients

    return np.asarray(deprocess_gradients(guided))


def explain_test_set(trained, args, out: Path) -> int:
    """Explains the highest-loss misclassified test images; writes grid + overlays; returns 0."""
    import jax

    from cifar_jax import viz
    from cifar_jax.data import load_dataset

    data_config = trained.config.data
    if args.data:
        data_config.path = args.data
    if data_config.source == "folder" and not Path(data_config.path).exists():
        raise ExplainError(f"test data {data_config.path!r} not found; pass --data PATH (image-folder tree or .tar.gz)")
    ds = load_dataset(data_config)
    worst = misclassified_by_loss(trained, ds.test_images, ds.test_labels)[: args.num]
    if len(worst) == 0:
        print("No misclassified test images: nothing to explain.")
        return 0
    images, labels = ds.test_images[worst], ds.test_labels[worst]
    target = resolve_target(args.target, trained.class_names)
    maps, targets, probs, guided = explain_maps(
        trained, images, target, method=args.method, layer=args.layer,
        aug_smooth=args.aug_smooth, eigen_smooth=args.eigen_smooth,
    )
    pictures = _guided_pictures(guided) if guided is not None else np.stack(
        [viz.heatmap_overlay(img, m, args.alpha) for img, m in zip(images, maps)]
    )
    names = trained.class_names
    titles = [
        f"true: {names[y]}\npred: {names[int(np.argmax(p))]} {p.max():.2f}" for y, p in zip(labels, probs)
    ]
    label = _method_label(args.method)
    if target is not None:
        label += f" ({names[target]})"
    viz.image_grid(out / "misclassified.png", images, titles, cols=5, title="Misclassified test images (highest loss first)")
    viz.image_grid(out / f"{args.method}.png", images, titles, overlays=pictures, cols=5,
                   title=f"{label} at {args.layer} over misclassified test images", overlay_label=label)
    for i, (idx, y, p, pic) in enumerate(zip(worst, labels, probs, pictures)):
        name = f"{i:03d}_test{idx}_true-{names[y]}_pred-{names[int(np.argmax(p))]}.png"
        viz.save_png(out / "overlays" / name, viz.upscale_nearest(pic, 4))
    print(f"Explained {len(worst)} misclassified test images with {label} at {args.layer}: "
          f"{out / (args.method + '.png')}, {out / 'misclassified.png'}, {out / 'overlays'}/")
    del jax
    return 0


def misclassified_by_loss(trained, images, labels, batch: int = 1000) -> np.ndarray:
    """Indices of misclassified images, highest cross-entropy first."""
    import jax
    import jax.numpy as jnp

    from cifar_jax.augment import normalize

    @jax.jit
    def losses_and_preds(variables, x, y):
        logits = trained.model.apply(variables, normalize(x, trained.mean, trained.std), train=False)
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]
        return loss, jnp.argmax(logits, -1)

    losses, preds = [], []
    for s in range(0, len(labels), batch):
        loss, pred = losses_and_preds(trained.variables, images[s : s + batch], labels[s : s + batch])
        losses.append(np.asarray(loss))
        preds.append(np.asarray(pred))
    losses, preds = np.concatenate(losses), np.concatenate(preds)
    wrong = np.flatnonzero(preds != labels)
    return wrong[np.argsort(-losses[wrong], kind="stable")]


def read_image(path: Path):
    """An image file as (H, W, 3) uint8 RGB (grayscale, RGBA, palette converted). Raises ExplainError."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise ExplainError(f"{path}: no such file")
    if path.is_dir():
        raise ExplainError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ExplainError(f"{path}: empty file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)  # Transparent pixels become white, not black.
            return np.asarray(im.convert("RGB"), np.uint8)
    except UnidentifiedImageError:
        raise ExplainError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ExplainError(f"{path}: cannot decode image ({e})") from None


def explain_files(trained, args, out: Path) -> int:
    """Explains user image files; returns the number of files that failed."""
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from cifar_jax import viz

    size = trained.config.data.image_size
    target = resolve_target(args.target, trained.class_names)
    names = trained.class_names
    failed = 0
    for raw_path in args.images:
        path = Path(raw_path)
        try:
            original = read_image(path)
        except ExplainError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        # PIL's bilinear resize filters when shrinking, so a large photo does not alias at 32x32.
        small = np.asarray(Image.fromarray(original).resize((size, size), Image.BILINEAR), np.uint8)
        maps, targets, probs, guided = explain_maps(
            trained, small[None], target, method=args.method, layer=args.layer,
            aug_smooth=args.aug_smooth, eigen_smooth=args.eigen_smooth,
        )
        h, w = original.shape[:2]
        cam_full = np.asarray(jax.image.resize(jnp.asarray(maps[0]), (h, w), "linear"))
        overlay_full = viz.heatmap_overlay(original, cam_full, args.alpha)
        stem = path.stem
        viz.save_png(out / f"{stem}_{args.method}.png", overlay_full)
        picture = _guided_pictures(guided)[0] if guided is not None else viz.heatmap_overlay(small, maps[0], args.alpha)
        viz.save_png(out / f"{stem}_{args.method}_{size}px.png", viz.upscale_nearest(picture, max(1, 128 // size)))
        top = np.argsort(-probs[0])[:3]
        ranking = ", ".join(f"{names[c]} {probs[0][c]:.3f}" for c in top)
        explained = names[int(targets[0])]
        print(f"{path}: {ranking} | {_method_label(args.method)} for {explained} -> {out / f'{stem}_{args.method}.png'}")
    return failed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from cifar_jax.cam import CAM_LAYERS
    from cifar_jax.checkpoints import CheckpointError, load_trained
    from cifar_jax.data import DataError
    from cifar_jax.train import enable_compilation_cache, quiet_library_logs

    quiet_library_logs()
    try:
        if args.layer not in CAM_LAYERS:
            raise ExplainError(f"unknown layer {args.layer!r}; choose one of {', '.join(CAM_LAYERS)}")
        if args.num <= 0:
            raise ExplainError(f"--num must be positive, got {args.num}")
        step = args.step if args.step in ("best", "latest") else _int_step(args.step)
        enable_compilation_cache()
        trained = load_trained(args.workdir, step)
        resolve_target(args.target, trained.class_names)  # Check before any work.
        out = Path(args.out) if args.out else Path(args.workdir) / "explain"
        out.mkdir(parents=True, exist_ok=True)
        if args.evaluate:
            return run_evaluation(trained, args, out)
        if args.images:
            failed = explain_files(trained, args, out)
            if failed:
                print(f"error: {failed} of {len(args.images)} images could not be explained", file=sys.stderr)
            return 1 if failed else 0
        return explain_test_set(trained, args, out)
    except (ExplainError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ExplainError) else 1


def _int_step(text: str) -> int:
    if not text.isdigit():
        raise ExplainError(f"--step must be best, latest or a step number, not {text!r}")
    return int(text)


def run_evaluation(trained, args, out: Path) -> int:
    """Faithfulness table of CAM methods on ``--eval-images`` test images, plus Grad-CAM's cascading
    randomisation; prints both and writes ``faithfulness.md`` and ``faithfulness.json``."""
    import json

    import jax

    from cifar_jax.cam import METHODS
    from cifar_jax.data import load_dataset, subsample
    from cifar_jax.faithfulness import cascading_randomization, evaluate_trained, format_table

    for m in args.methods or ():
        if m not in METHODS:
            raise ExplainError(f"unknown CAM method {m!r}; choose from {', '.join(METHODS)}")
    if args.eval_images <= 0:
        raise ExplainError(f"--eval-images must be positive, got {args.eval_images}")
    data_config = trained.config.data
    if args.data:
        data_config.path = args.data
    ds = subsample(load_dataset(data_config), 0, args.eval_images)
    rows = evaluate_trained(trained, ds.test_images, ds.test_labels, methods=args.methods, seed=args.seed, layer=args.layer)
    table = format_table(rows)
    from cifar_jax.augment import normalize

    sanity_n = min(100, len(ds.test_labels))
    cascade = cascading_randomization(
        trained.model, trained.variables, normalize(ds.test_images[:sanity_n], trained.mean, trained.std),
        ds.test_labels[:sanity_n], jax.random.key(args.seed), method="gradcam", layer=args.layer,
    )
    cascade_table = "| layers randomised (top down) | Spearman vs trained |\n|---|---:|\n" + "\n".join(
        f"| {r['randomized']} | {r['spearman']:.3f} |" for r in cascade
    )
    header = (
        f"Faithfulness on {len(ds.test_labels)} test images (class-balanced, true labels explained), "
        f"layer {args.layer}, seed {args.seed}. Arrows: which way is better.\n\n"
    )
    text = (header + table + f"\n\nGrad-CAM cascading randomisation sanity check on {sanity_n} images:\n\n" + cascade_table + "\n")
    print(text)
    (out / "faithfulness.md").write_text(text)
    record = {"num_images": len(ds.test_labels), "layer": args.layer, "seed": args.seed, "rows": rows, "cascade": cascade}
    (out / "faithfulness.json").write_text(json.dumps(record, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
