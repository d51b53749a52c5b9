"""Where `explain --evaluate`'s time goes: one 100-image batch of each per-image metric for Grad-CAM maps.

    python benchmarks/faithfulness_profile.py runs/w16

The first call's wall time (compilation included, no persistent cache) and the best of 2 later ones of the
Grad-CAM maps, the deletion and insertion curves (33 points), ROAD-MoRF (9 levels) and average drop, all
through the run's network on the image alone (what ``explain --evaluate`` scores), and of one forward pass
(with XLA's kernels too where the network uses oneDNN's).
"""
import sys

import time, jax
from cifar_jax import cam, faithfulness as F
from cifar_jax.inference import load_test_images, load_trained
t = load_trained(sys.argv[1])
x, y = load_test_images(t, 100)
def timed(f, reps=2):
    s = time.perf_counter(); jax.block_until_ready(f()); first = time.perf_counter() - s; ts = []
    for _ in range(reps):
        s = time.perf_counter(); jax.block_until_ready(f()); ts.append(time.perf_counter() - s)
    return f"first {first:.2f}s, then {min(ts):.3f}s"
logits_fn = F.model_logits_fn(t.network, t.variables)  # the network on the image alone, as explain --evaluate
k = jax.random.key(0)
print(f"gradcam maps, 100 images: {timed(lambda: cam.saliency_maps('gradcam', t.network, t.variables, x, y))}")
sal = cam.saliency_maps("gradcam", t.network, t.variables, x, y)
print(f"deletion curve (33 points): {timed(lambda: F.deletion_curve(logits_fn, x, sal, y, key=k))}")
print(f"insertion curve (33 points): {timed(lambda: F.insertion_curve(logits_fn, x, sal, y, key=k))}")
print(f"ROAD MoRF (9 levels): {timed(lambda: F.road_curve(logits_fn, x, sal, y, k))}")
print(f"average drop: {timed(lambda: F.average_drop_increase(logits_fn, x, sal, y, mean=t.mean, std=t.std))}")
forward = jax.jit(lambda f, x: f(x))
print(f"forward pass, 100 images, the run's network: {timed(lambda: forward(logits_fn, x))}")
if t.network is not t.model:  # oneDNN's kernels: the same pass with XLA's
    print(f"forward pass, 100 images, XLA's kernels: {timed(lambda: forward(F.model_logits_fn(t.model, t.variables), x))}")
