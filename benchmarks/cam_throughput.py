"""Grad-CAM images/s: one batched compiled compute_cams call vs a per-image loop (and pytorch-grad-cam if installed).

    python benchmarks/cam_throughput.py [--quick] [--n 256] [--workdir runs/resnet18_cpu] [--out r.json]
    python benchmarks/cam_throughput.py --methods all [--layer layer4]   # every method, batched vs per-image loop

With --methods (names, or "all" for cifar_jax.cam.ALL_METHODS) each method is timed
through ``cifar_jax.cam.saliency_maps`` on the same images and predicted classes.

With --workdir the trained model of that run explains real test images;
otherwise a freshly initialised width-16 ResNet18 does. pytorch-grad-cam
(``pip install --no-deps grad-cam ttach opencv-python-headless`` next to
torch==2.13.0) runs on the same weights copied into the PyTorch twin of the
model; its maps are compared with ours.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np

from _common import ROOT, benchmark_config, finish, parser, timed, warn_if_busy


def import_pytorch_grad_cam():
    """pytorch_grad_cam, or None. A stub stands in for torchvision if that is missing or broken (Grad-CAM does not use it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception:  # The PyPI torchvision wheel is CUDA-only; pytorch_grad_cam merely imports a few names from it.
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops"):
            sys.modules[name] = types.ModuleType(name)
        for attr in ("Compose", "Normalize", "ToTensor"):
            setattr(sys.modules["torchvision.transforms"], attr, None)
        sys.modules["torchvision.transforms.functional"].resize = None
    try:
        import pytorch_grad_cam
    except ImportError:
        return None
    return pytorch_grad_cam


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="images explained")
    p.add_argument("--width", type=int, default=16, help="ResNet18 width when no --workdir is given")
    p.add_argument("--workdir", help="a training run whose best checkpoint to explain")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", help='also time these methods ("all": every one), batched vs per-image loop')
    p.add_argument("--layer", default="layer4", help="layer the CAM methods explain with --methods")
    args = p.parse_args()
    busy = warn_if_busy(args)
    import jax

    from cifar_jax import train_lib
    from cifar_jax.augment import normalize
    from cifar_jax.cam import compute_cams
    from cifar_jax.data import load_dataset

    if args.quick:
        args.n, args.width, args.repeats = 8, 4, 2
    config = benchmark_config()  # Width (--width) and float32 when no --workdir is given.
    config.data.path = str(ROOT / config.data.path)
    dataset = load_dataset(config.data)
    if args.workdir:
        from cifar_jax.inference import load_trained

        trained = load_trained(args.workdir)
        model, variables, mean, std = trained.network, trained.variables, trained.mean, trained.std
        width = trained.config.model.width
    else:
        config.model.width = width = args.width
        model = train_lib.build_model(config, dataset.num_classes)
        variables = train_lib.init_variables(model, jax.random.key(0))
        mean, std = dataset.channel_stats()
    pick = np.linspace(0, len(dataset.test_labels) - 1, args.n).astype(int)  # Spread over the class-sorted test set.
    images = np.asarray(normalize(dataset.test_images[pick], mean, std))  # (N, 32, 32, 3) float32 on the host.
    n = len(images)

    def batched():
        return jax.block_until_ready(compute_cams(model, variables, images).maps)

    def per_image():
        return [jax.block_until_ready(compute_cams(model, variables, images[i : i + 1]).maps) for i in range(n)]

    print(f"ResNet18 width {width}, {n} images, layer4 Grad-CAM, {args.repeats} repeats", flush=True)
    ours = batched()  # Compiles for N images.
    compute_cams(model, variables, images[:1]).maps.block_until_ready()  # Compiles for 1 image.
    t_batch, _ = timed(batched, args.repeats)
    t_loop, _ = timed(per_image, args.repeats)
    rows = [
        dict(impl=f"cifar_jax batched (N={n})", seconds=t_batch, images_per_s=n / t_batch, speedup_vs_loop=t_loop / t_batch),
        dict(impl="cifar_jax per-image loop", seconds=t_loop, images_per_s=n / t_loop, speedup_vs_loop=1.0),
    ]
    extra = {"batched_over_loop": t_loop / t_batch, "width": width, "n": n, "busy": busy}

    if args.methods:
        rows += time_methods(args, model, variables, images, np.asarray(compute_cams(model, variables, images).targets))

    gc = import_pytorch_grad_cam()
    if gc is None:
        print("pytorch_grad_cam is not importable: skipping the comparison (pip install torch==2.13.0, then "
              "pip install --no-deps grad-cam ttach opencv-python-headless).")
    else:
        import torch

        from pytorch_grad_cam.utils.image import scale_cam_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        from _torch_resnet import ResNet18, load_flax_variables

        torch.set_num_threads(os.cpu_count())
        twin = ResNet18(width, dataset.num_classes).eval()
        load_flax_variables(twin, variables)
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        cams = compute_cams(model, variables, images)
        targets = [ClassifierOutputTarget(int(t)) for t in np.asarray(cams.targets)]  # Same classes as ours.
        with torch.no_grad():
            logit_diff = float(np.abs(twin(x).numpy() - np.asarray(cams.logits)).max())
        cam = gc.GradCAM(model=twin, target_layers=[twin.layer4.block1])
        theirs = cam(input_tensor=x, targets=targets)  # Warm-up.
        t_torch, _ = timed(lambda: cam(input_tensor=x, targets=targets), args.repeats)
        rows.append(dict(impl=f"pytorch-grad-cam batched (N={n})", seconds=t_torch, images_per_s=n / t_torch,
                         speedup_vs_loop=t_loop / t_torch))
        # Theirs min-max scales at 4x4, resizes with cv2 and scales again; ours resizes then scales once.
        same_post = scale_cam_image(np.asarray(cams.raw), (images.shape[2], images.shape[1]))
        same_post = scale_cam_image(same_post)
        extra["agreement"] = {
            "max_abs_logit_diff": logit_diff,
            "max_abs_map_diff": float(np.abs(np.asarray(ours) - theirs).max()),
            "max_abs_map_diff_same_postprocessing": float(np.abs(same_post - theirs).max()),
        }
        extra["jax_over_pytorch_grad_cam"] = t_torch / t_batch
    finish("cam_throughput", args, rows, ["impl", "seconds", "images_per_s", "speedup_vs_loop"], **extra)
    if "agreement" in extra:
        print("agreement with pytorch-grad-cam:", {k: f"{v:.2e}" for k, v in extra["agreement"].items()})


def time_methods(args, model, variables, images, targets) -> list[dict]:
    """One row per method: images/s of one batched call and of a per-image loop (each compiled first)."""
    import jax

    from cifar_jax import cam

    methods = cam.ALL_METHODS if args.methods == ["all"] else [cam.canonical_method(m) for m in args.methods]
    key = jax.random.key(0)
    rows = []
    for m in methods:
        run = lambda x, t: jax.block_until_ready(cam.saliency_maps(m, model, variables, x, t, layer=args.layer, key=key))
        run(images, targets), run(images[:1], targets[:1])  # compile both shapes
        t_batch, _ = timed(lambda: run(images, targets), args.repeats)
        t_loop, _ = timed(lambda: [run(images[i : i + 1], targets[i : i + 1]) for i in range(len(images))], args.repeats)
        n = len(images)
        rows.append(dict(impl=f"{m} batched (N={n})", seconds=t_batch, images_per_s=n / t_batch, speedup_vs_loop=t_loop / t_batch))
        rows.append(dict(impl=f"{m} per-image loop", seconds=t_loop, images_per_s=n / t_loop, speedup_vs_loop=1.0))
        print(f"{m}: {n / t_batch:.1f} images/s batched, {n / t_loop:.1f} per image", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
