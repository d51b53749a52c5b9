"""Where `explain --evaluate`'s time goes: one 100-image batch of each per-image metric for Grad-CAM maps.

    python benchmarks/faithfulness_profile.py runs/w16

Best of 2 wall times (compilation excluded) of the Grad-CAM maps, the deletion and insertion curves
(33 points), ROAD-MoRF (9 levels) and average drop, all through the run's predictor (flip-averaged where
the run used it), and of one predictor call.
"""
import sys

import time, jax, jax.numpy as jnp
from cifar_jax import cam, faithfulness as F
from cifar_jax.augment import normalize
from cifar_jax.data import subsample
from cifar_jax.inference import load_run_data, load_trained
t = load_trained(sys.argv[1])
ds = subsample(load_run_data(t), 0, 100)
x = jnp.asarray(normalize(ds.test_images, t.mean, t.std)); y = jnp.asarray(ds.test_labels, jnp.int32)
def timed(f, reps=2):
    jax.block_until_ready(f()); ts = []
    for _ in range(reps):
        s = time.perf_counter(); jax.block_until_ready(f()); ts.append(time.perf_counter() - s)
    return min(ts)
sal = cam.saliency_maps("gradcam", t.model, t.variables, x, y)
k = jax.random.key(0)
print(f"gradcam maps, 100 images: {timed(lambda: cam.saliency_maps('gradcam', t.model, t.variables, x, y)):.2f}s")
print(f"deletion curve (33 points): {timed(lambda: F.deletion_curve(t.logits_fn, x, sal, y, key=k)):.2f}s")
print(f"insertion curve (33 points): {timed(lambda: F.insertion_curve(t.logits_fn, x, sal, y, key=k)):.2f}s")
print(f"ROAD MoRF (9 levels): {timed(lambda: F.road_curve(t.logits_fn, x, sal, y, k)):.2f}s")
print(f"average drop: {timed(lambda: F.average_drop_increase(t.logits_fn, x, sal, y, mean=t.mean, std=t.std)):.2f}s")
print(f"flip-averaged predictor forward, 100 images: {timed(lambda: t.logits_fn(x)):.3f}s")
