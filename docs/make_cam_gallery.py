"""Every CAM and attribution method on the same test images, one PNG: rows = images, columns = methods.

    python docs/make_cam_gallery.py --workdir runs/resnet18_cpu [--num 6] [--layer layer4] [--out docs/cam_gallery.png]
    python docs/make_cam_gallery.py --tiny --out /tmp/gallery.png   # untrained width-4 ResNet10, random images: checks it runs

With --workdir the best checkpoint (``cifar_jax.inference.load_trained``) explains
class-spread test images of the data it was trained on, for their predicted classes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(args):
    """(model, variables, uint8 images (N, H, W, 3), normalised images, class names)."""
    import jax
    import jax.numpy as jnp

    from cifar_jax.augment import normalize

    if args.tiny:
        from cifar_jax.models import get_model

        model = get_model("resnet10", width=4)
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
        raw = np.random.default_rng(0).integers(0, 256, (args.num, 32, 32, 3), dtype=np.uint8)
        mean, std, names = np.full(3, 127.5), np.full(3, 64.0), tuple(str(i) for i in range(10))
    else:
        from cifar_jax import inference

        trained = inference.load_trained(args.workdir)
        ds = inference.load_run_data(trained, args.data)
        pick = np.linspace(0, len(ds.test_labels) - 1, args.num).astype(int)  # spread over the class-sorted test set
        raw, model, variables = ds.test_images[pick], trained.model, trained.variables
        mean, std, names = trained.mean, trained.std, trained.class_names
    return model, variables, raw, np.asarray(normalize(raw, mean, std)), names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a training run (best checkpoint)")
    p.add_argument("--tiny", action="store_true", help="untrained tiny model and random images instead of --workdir")
    p.add_argument("--data", help="data path, if not the one the model was trained with")
    p.add_argument("--num", type=int, default=6, help="images (rows)")
    p.add_argument("--layer", default="layer4", help="module path the CAM methods explain")
    p.add_argument("--methods", nargs="+", help="default: every method in cifar_jax.cam.ALL_METHODS")
    p.add_argument("--out", default=str(ROOT / "docs" / "cam_gallery.png"))
    args = p.parse_args(argv)
    if not args.tiny and not args.workdir:
        p.error("give --workdir DIR or --tiny")
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cifar_jax import cam, viz

    model, variables, raw, x, names = load(args)
    predicted = np.asarray(jax.numpy.argmax(model.apply(variables, x, train=False), -1))
    methods = [cam.canonical_method(m) for m in (args.methods or cam.ALL_METHODS)]
    columns = []
    for m in methods:
        t0 = time.perf_counter()
        maps = np.asarray(cam.saliency_maps(m, model, variables, x, predicted, layer=args.layer, key=jax.random.key(0)))
        print(f"{m:22s} {time.perf_counter() - t0:6.2f} s (compile included)", flush=True)
        columns.append((m, maps))
    fig, axes = plt.subplots(len(raw), len(columns) + 1, figsize=(1.3 * (len(columns) + 1), 1.4 * len(raw)), squeeze=False)
    for i, image in enumerate(raw):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(names[predicted[i]], fontsize=7)
        for j, (m, maps) in enumerate(columns, start=1):
            axes[i, j].imshow(viz.heatmap_overlay(image, maps[i]))
            if i == 0:
                axes[i, j].set_title(m, fontsize=6)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{args.layer} for the CAM methods; predicted classes explained", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
