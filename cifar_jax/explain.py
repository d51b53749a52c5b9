"""Explain a trained model's predictions: python -m cifar_jax.explain --workdir DIR

Default: the ``--num`` misclassified test images with the highest loss, as one grid PNG
(image, true and predicted class, heat-map overlay), one overlay per image and the maps
themselves (``maps.npz``). ``--images PATH...`` explains your own images of any size and
format and prints the top-3 classes. ``--evaluate`` scores the CAM methods' faithfulness.
The computing lives in ``cifar_jax.inference`` and ``cifar_jax.faithfulness``; this file is
intentionally kept short.
"""

from __future__ import annotations

if __name__ == "__main__":  # Run as a command: a signal from here on ends it in one line (cifar_jax.early).
    from cifar_jax import early

    early.install()

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cifar_jax import runtime
from cifar_jax.errors import UserError
from cifar_jax.files import atomic_path, atomic_paths
from cifar_jax.inference import METHOD_LABELS, ExplainError, canonical_method


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m cifar_jax.explain", description=__doc__.split("\n\n")[0],
        epilog="--evaluate on 1,000 test images takes minutes on 2 CPU cores and seconds on a GPU once compiled, with a "
               "progress bar and ETA (measured durations: docs/faithfulness.md); explaining 20 test images or a few files "
               "takes seconds.")
    p.add_argument("--workdir", required=True, help="training workdir with checkpoints")
    p.add_argument("--images", nargs="+", metavar="PATH", help="explain these image files instead of test images")
    p.add_argument("--method", default="gradcam", help=f"one of {', '.join(METHOD_LABELS)} (any spelling, e.g. guided_grad_cam, Grad-CAM++; default gradcam)")
    p.add_argument("--layer", help="module path to explain, e.g. layer4, layer3/block0, layer3/block0/conv2 (default: the "
                   "model's last stage, layer4 for ResNets; see --list-layers)")
    p.add_argument("--list-layers", action="store_true", help="print the model's module paths and output shapes, then exit")
    p.add_argument("--target", help="class name or index to explain (default: the predicted class)")
    p.add_argument("--num", type=int, default=20, help="misclassified test images to show (default 20)")
    p.add_argument("--out", help="output folder (default DIR/explain)")
    p.add_argument("--step", default="best", help="checkpoint: best, latest or a step number (default best)")
    p.add_argument("--data", help="data path, if not the one the model was trained with")
    p.add_argument("--aug-smooth", action="store_true", help="average with the map of the mirrored image")
    p.add_argument("--eigen-smooth", action="store_true", help="first principal component of the weighted activations")
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity in overlays (default 0.5)")
    p.add_argument("--evaluate", action="store_true", help="score every CAM method's faithfulness and write a table (minutes: see below)")
    p.add_argument("--eval-images", type=int, default=1000, help="test images for --evaluate (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of random baselines and randomisation (default 0)")
    p.add_argument("--methods", nargs="+", help="CAM methods for --evaluate (default: all but scorecam)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return runtime.run_cli(lambda: _run(args))


def _run(args) -> int:
    from cifar_jax import inference

    method = canonical_method(args.method)
    if args.num <= 0:
        raise ExplainError(f"--num must be positive, got {args.num}")
    runtime.enable_compilation_cache()
    trained = inference.load_trained(args.workdir, args.step)
    if args.list_layers:
        from cifar_jax.cam import format_layers

        print(format_layers(inference.list_layers(trained)))
        return 0
    args.layer = args.layer or trained.cam_layer
    inference.check_layer(trained, args.layer)
    target = inference.class_index(args.target, trained.class_names)
    print(f"Model: step {trained.step} of {args.workdir} ({trained.config.model.name} width {trained.config.model.width}"
          f"{f', predictions averaged over {trained.describe_views()}' if trained.describe_views() else ''})")
    out = Path(args.out) if args.out else Path(args.workdir) / "explain"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExplainError(f"cannot create the output folder {str(out)!r}: {e.strerror or e}; "
                           "give another (writable) folder with --out DIR") from None
    if args.evaluate:
        return evaluate(trained, args, out)
    if args.images:
        failed = explain_files(trained, args, method, target, out)
        if failed:
            raise UserError(f"{failed} of {len(args.images)} images could not be explained")
        return 0
    return explain_test_set(trained, args, method, target, out)


def explain_test_set(trained, args, method: str, target, out: Path) -> int:
    """Explains the highest-loss misclassified test images; writes grids, overlays and maps.npz."""
    from cifar_jax import inference, viz

    ds = inference.load_run_data(trained, args.data)
    preds = inference.predict(trained, ds.test_images, ds.test_labels, progress=True)
    worst = inference.misclassified_by_loss(preds)[: args.num]
    if len(worst) == 0:
        print("No misclassified test images: nothing to explain.")
        return 0
    images, names = ds.test_images[worst], trained.class_names
    targets = preds.predicted[worst] if target is None else target
    expl = inference.explain(trained, images, targets, method=method, layer=args.layer,
                             aug_smooth=args.aug_smooth, eigen_smooth=args.eigen_smooth)
    pictures = viz.explanation_pictures(images, expl, args.alpha)
    probs = preds.probabilities[worst]
    titles = [f"true: {names[y]}\npred: {names[int(p.argmax())]} {p.max():.2f}" for y, p in zip(preds.labels[worst], probs)]
    label = METHOD_LABELS[method] + (f" ({names[target]})" if target is not None else "")
    grid = out / f"misclassified_{method}.png"
    viz.image_grid(out / "misclassified.png", images, titles, cols=5, title="Misclassified test images (highest loss first)")
    viz.image_grid(grid, images, titles, overlays=pictures, cols=5, title=f"{label} at {args.layer} over misclassified "
                   f"test images ", overlay_label=label,
                   colorbar=expl.guided is None)
    for i, (idx, y, p, pic, t) in enumerate(zip(worst, preds.labels[worst], probs, pictures, expl.targets)):
        pred = names[int(p.argmax())]
        viz.explanation_figure(out / "overlays" / f"{i:03d}_test{idx}_true-{names[y]}_pred-{pred}_{method}.png",
                               images[i], pic, f"Test image {idx}: true {names[y]}, predicted {pred} ({p.max():.1%})",
                               f"{METHOD_LABELS[method]} at {args.layer} for {names[int(t)]}", colorbar=expl.guided is None)
    with atomic_path(out / "maps.npz", suffix=".npz") as tmp:
        np.savez(tmp, maps=expl.maps, targets=expl.targets, test_indices=worst)
    print(f"Explained {len(worst)} misclassified test images with {label} at {args.layer}: "
          f"{grid}, {out / 'misclassified.png'}, {out / 'overlays'}/ (one labelled figure each), {out / 'maps.npz'}")
    return 0


def explain_files(trained, args, method: str, target, out: Path) -> int:
    """Explains user image files one by one; a bad file is one line on stderr. Returns how many failed."""
    import jax
    import jax.numpy as jnp

    from cifar_jax import images as image_io
    from cifar_jax import inference, viz

    size, names = trained.config.data.image_size, trained.class_names
    failed = 0
    for path, stem in zip(map(Path, args.images), image_io.output_stems(args.images)):
        try:
            loaded = image_io.load_image(path, image_io.MAX_SIDE)  # At most MAX_SIDE pixels a side: bounded memory.
        except image_io.ImageError as e:
            print(f"error: {e.message}", file=sys.stderr)
            failed += 1
            continue
        original = loaded.pixels
        small = image_io.resize(original, size)
        probs = np.asarray(jax.nn.softmax(trained.logits(small[None])))[0]  # THE predictor, once per image
        expl = inference.explain(trained, small[None], int(probs.argmax()) if target is None else target, method=method,
                                 layer=args.layer, aug_smooth=args.aug_smooth, eigen_smooth=args.eigen_smooth)
        h, w = original.shape[:2]
        explained, predicted = names[int(expl.targets[0])], names[int(probs.argmax())]
        if expl.guided is None:  # A heat map: drawn over the image at the image's own resolution.
            cam_full = np.asarray(jax.image.resize(jnp.asarray(expl.maps[0], jnp.float32), (h, w), "linear"))
            picture = viz.heatmap_overlay(original, cam_full, args.alpha)
            del cam_full
            viz.save_png(out / f"{stem}_{method}_overlay.png", picture)  # The bare overlay, pixel for pixel.
        else:  # Guided gradients: at the model's input size.
            picture = viz.explanation_pictures(small[None], expl, args.alpha)[0]
        figure = out / f"{stem}_{method}.png"
        top3 = ", ".join(f"{names[c]} {probs[c]:.1%}" for c in np.argsort(-probs)[:3])
        viz.explanation_figure(figure, original, picture, f"{path.name}: predicted {predicted} ({probs.max():.1%}); top 3: {top3}",
                               f"{METHOD_LABELS[method]} at {args.layer} for {explained}", colorbar=expl.guided is None)
        del picture
        ranking = ", ".join(f"{names[c]} {probs[c]:.3f}" for c in np.argsort(-probs)[:3])
        drawn = f" (drawn at {w}x{h} of {loaded.original_size[0]}x{loaded.original_size[1]})" if loaded.shrunk else ""
        print(f"{path}: {ranking} | {METHOD_LABELS[method]} at {args.layer} for {explained} -> {figure}{drawn}")
    return failed


def evaluate(trained, args, out: Path) -> int:
    """Writes the faithfulness table (faithfulness.md, .json) of ``--eval-images`` test images."""
    from cifar_jax import faithfulness_table, inference
    from cifar_jax.data import subsample

    if args.eval_images <= 0:
        raise ExplainError(f"--eval-images must be positive, got {args.eval_images}")
    methods = [canonical_method(m) for m in args.methods] if args.methods else None
    ds = subsample(inference.load_run_data(trained, args.data), 0, args.eval_images)
    text, record = faithfulness_table.trained_model_report(trained, ds.test_images, ds.test_labels, methods=methods,
                                                     seed=args.seed, layer=args.layer, progress=True)
    print(text)
    with atomic_paths(out / "faithfulness.md", out / "faithfulness.json") as (md, js):  # Replaced together.
        md.write_text(text)
        js.write_text(json.dumps(record, indent=1, default=float))
    print(f"Faithfulness table written to {out / 'faithfulness.md'} and {out / 'faithfulness.json'}")
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
