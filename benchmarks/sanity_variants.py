"""The randomisation sanity check of a trained run under variants of its definition (docs/faithfulness.md).

    python benchmarks/sanity_variants.py --workdir runs/w32 --images 100 --draws 8

For Grad-CAM at ``--layer`` it prints, per cascade row (layers re-initialised top down), the mean and
spread over ``--draws`` random re-initialisations of the mean Spearman vs the trained maps, for:

* ``maps``:   the upsampled (32x32), ReLU'd, min-max scaled maps (what ``cam.saliency_maps`` returns);
* ``raw``:    the ReLU'd maps at the layer's resolution (4x4 at layer4), before upsampling;
* ``signed``: the map before ReLU (sum over channels of weight x activation), at the layer's resolution;
* ``abs``:    |signed|;
* ``maps, BN refit``: ``maps`` with the BatchNorm running statistics of the re-initialised layers
  replaced by the statistics of the images themselves under the random weights.

It also prints the fraction of randomised maps that are constant (Spearman undefined) and a null:
the mean Spearman between the trained maps of different images (the spatial prior shared by all
images), and between each draw's randomised maps and the mean trained map.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import cam
from cifar_jax.inference import load_test_images, load_trained
from cifar_jax.models import PARAM_GROUPS
from cifar_jax.sanity import _replace_groups, fresh_variables, spearman


def signed_gradcam(model, variables, images, targets, layer):
    """Grad-CAM before ReLU at the layer's resolution: (N, h, w)."""
    acts, grads, _ = cam.activations_and_grads(model, variables, images, targets, layer)
    return (acts * grads.mean(axis=(1, 2), keepdims=True)).sum(-1)


def refit_batch_stats(model, variables, images, groups):
    """``variables`` with the batch_stats of ``groups`` set to the images' own statistics (train-mode pass)."""
    _, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
    # nn.BatchNorm's update: new = 0.9 old + 0.1 batch, so batch = (new - 0.9 old) / 0.1.
    batch = jax.tree.map(lambda new, old: (new - 0.9 * old) / 0.1, updated["batch_stats"], variables["batch_stats"])
    return _replace_groups(variables, {"params": variables["params"], "batch_stats": batch}, groups)


def variants(model, variables, images, targets, layer):
    """{variant: (N, ...) maps} of one set of variables."""
    cams = cam.compute_cams(model, variables, images, targets, method="gradcam", layer=layer)
    signed = signed_gradcam(model, variables, images, targets, layer)
    return {"maps": cams.maps, "raw": cams.raw, "signed": signed, "abs": jnp.abs(signed)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--layer", default="layer4")
    args = p.parse_args()

    trained = load_trained(args.workdir)
    images, targets = load_test_images(trained, args.images, args.data)
    model, variables = trained.network, trained.variables
    ref = variants(model, variables, images, targets, args.layer)

    # Null: trained maps of different images (image i vs image i+1).
    shifted = {k: jnp.roll(v, 1, axis=0) for k, v in ref.items()}
    print(f"Grad-CAM at {args.layer}, {args.images} test images, {args.draws} draws; cells: mean over draws "
          "[min, max] of the mean-over-images Spearman\n")
    print("null, trained maps of different images: " + ", ".join(
        f"{k} {float(jnp.nanmean(spearman(ref[k], shifted[k]))):.3f}" for k in ref))

    names = ["none"] + ["+".join(PARAM_GROUPS[: i + 1]) for i in range(len(PARAM_GROUPS))]
    table = {name: {k: [] for k in (*ref, "maps, BN refit")} for name in names}
    constant = {name: [] for name in names}
    prior = []
    mean_map = ref["maps"].mean(0, keepdims=True)
    for d in range(args.draws):
        fresh = fresh_variables(model, jax.random.key(d), images.shape[1:])
        for i, name in enumerate(names):
            groups = PARAM_GROUPS[:i]
            rand = _replace_groups(variables, fresh, groups)
            out = variants(model, rand, images, targets, args.layer)
            refit = refit_batch_stats(model, rand, images, groups) if groups else rand
            out["maps, BN refit"] = cam.compute_cams(model, refit, images, targets, method="gradcam", layer=args.layer).maps
            for k, v in out.items():
                table[name][k].append(float(jnp.nanmean(spearman(ref[k if k in ref else "maps"], v))))
            constant[name].append(float(jnp.mean(jnp.isnan(spearman(ref["maps"], out["maps"])))))
            if i == len(PARAM_GROUPS):
                prior.append(float(jnp.nanmean(spearman(jnp.broadcast_to(mean_map, out["maps"].shape), out["maps"]))))

    cols = list(table["none"])
    print("\n| layers randomised | " + " | ".join(cols) + " | constant maps |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for name in names:
        cells = [f"{np.mean(v):.3f} [{np.min(v):.2f}, {np.max(v):.2f}]" for v in table[name].values()]
        print(f"| {name} | " + " | ".join(cells) + f" | {np.mean(constant[name]):.2f} |")
    print("\nfully randomised maps vs the mean trained map, per draw: " + ", ".join(f"{v:.2f}" for v in prior))


if __name__ == "__main__":
    main()
