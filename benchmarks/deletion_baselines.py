"""Deletion AUC of Grad-CAM and the two baseline maps under three deletion baselines (docs/faithfulness.md).

    python benchmarks/deletion_baselines.py --workdir runs/w32 --images 200

Deleted pixels take: "mean" (zeros in normalised space: the training mean colour,
``deletion_fill="mean"``), "black" (pixel value 0) or "blur" (the image blurred with sigma 4, the
start of the insertion curve and the default of ``faithfulness.deletion_curve``; Petsiuk et al. 2018
use a constant for deletion and a blur for insertion). Prints the mean AUC per (map, baseline) and the mean target probability after 5%, 10%, 25%
of the pixels are deleted, the true classes explained, the run's predictor perturbed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import cam
from cifar_jax import faithfulness as F
from cifar_jax.inference import load_test_images, load_trained

STEPS = 32


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args()

    trained = load_trained(args.workdir)
    images, targets = load_test_images(trained, args.images, args.data)
    black = jnp.asarray(-np.asarray(trained.mean) / np.asarray(trained.std), jnp.float32)
    curves = {}
    for start in range(0, args.images, args.batch):
        x, t = images[start : start + args.batch], targets[start : start + args.batch]
        maps = {
            "gradcam": cam.saliency_maps("gradcam", trained.network, trained.variables, x, t),
            "random": F.random_saliency(jax.random.key(start), x.shape[:3]),
            "gaussian": F.gaussian_saliency(x.shape[:3]),
        }
        bases = {"mean": jnp.zeros_like(x), "black": jnp.broadcast_to(black, x.shape), "blur": F.gaussian_blur(x, 4.0)}
        k = jax.random.key(1000 + start)
        for m, sal in maps.items():
            for b, base in bases.items():
                c = F.deletion_curve(F.model_logits_fn(trained.network, trained.variables), x, sal, t, steps=STEPS, baseline=base, key=k)
                curves.setdefault((m, b), []).append(np.asarray(c))
    print(f"{args.images} test images, true classes, {STEPS} steps; AUC (lower = more faithful) and p(target) after deleting 0/5/10/25%")
    print("| map | baseline | deletion AUC | p 0% | p 5% | p 10% | p 25% |\n|---|---|---:|---:|---:|---:|---:|")
    for (m, b), parts in curves.items():
        c = np.concatenate(parts)
        at = lambda f: c[:, int(round(f * STEPS))].mean()
        print(f"| {m} | {b} | {float(F.auc(jnp.asarray(c)).mean()):.3f} | {at(0):.3f} | {at(0.05):.3f} | {at(0.1):.3f} | {at(0.25):.3f} |")


if __name__ == "__main__":
    main()
