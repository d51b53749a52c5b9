"""A narrow ResNet18 that 2 CPU cores train on the JPEG CIFAR-10 copy in under 45 minutes, on any CPU.

Same architecture as the original with fewer channels, oneDNN convolutions (``pip install -e ".[onednn]"``;
model.conv=auto picks them) and ``model.dtype="auto"``, resolved at startup in one printed line:

- bfloat16 (float32 parameters) on a CPU with AVX512-BF16 or AMX: width 24 (24-48-96-192), 21 epochs of batch 256.
  Measured on an AMD EPYC with AVX-512 + AVX512-BF16, 2 cores: docs/results/resnet18_cpu.
- float32 elsewhere (no native bfloat16: oneDNN has no bfloat16 kernels there and XLA's are several times slower),
  with the narrower, shorter recipe of ``auto_float32`` below: width 16, 20 epochs of batch 128, test-time shifts.
  Measured on an Intel Xeon (Ice Lake, AVX-512 + VNNI, no BF16), 2 cores: docs/results/resnet18_cpu_float32.

Every figure behind these choices (accuracy, images/s, minutes, per machine) is in docs/results.md and
docs/benchmarks.md. Run from the project root:

    python -m cifar_jax.train --config experiments/resnet18_cpu.py --workdir runs/resnet18_cpu

``--config.model.dtype=float32`` (or bfloat16) forces that dtype with the width-24 recipe; the width-16 recipe of
``auto_float32`` applies only when ``auto`` resolves to float32.
"""

from cifar_jax.config import base_config


def get_config():
    config = base_config()
    config.model.width = 24  # 3/8 of the channels: ~7x fewer FLOPs; the widest net whose 21 epochs fit the budget.
    # bfloat16 compute where the CPU runs it natively (faster than float32 there); float32 elsewhere, with the
    # recipe of auto_float32 below (cifar_jax.onednn.fast_dtype decides and the first line of the run says so).
    config.model.dtype = "auto"
    config.epochs = 21  # What fits in 45 minutes on 2 cores at width 24.
    config.batch_size = 256  # Smaller batches: more steps in few epochs, and fits the CPU caches better.
    config.optim.lr = 0.2
    config.optim.warmup_fraction = 0.2  # A shorter run peaks sooner.
    config.optim.label_smoothing = 0.1  # Helped in every short run tried.
    config.augment.cutout = 0  # A short run of a narrow net under-fits with cutout (train accuracy ends below test).
    config.eval_flip = True  # Test-time flip averaging: free accuracy at evaluation.
    # One JAX device: the oneDNN kernels use both cores themselves (2 devices would shard the step, where
    # model.conv=auto falls back to XLA's kernels: several times slower).
    config.cpu_devices = 0
    # torchvision's He init: what the measured runs (docs/results.md) used; PyTorch's default (the base config's) has
    # not been run at this size for 21 epochs yet.
    config.model.init = "he"

    # Without native bfloat16, oneDNN's float32 kernels are the fast path; a narrower net buys the lost speed back.
    config.auto_float32 = {
        "model": {"width": 16},  # Width 24 runs at less than half the images/s of width 16 in float32.
        "epochs": 20,  # What fits in 45 minutes at width 16, evaluations included.
        "batch_size": 128,  # Twice the steps of batch 256 at about the same images/s...
        "optim": {"lr": 0.1},  # ...with the lr scaled with the batch.
        "eval_translate": 1,  # airbench's 1-pixel shifted views: more accuracy for the narrower net.
        "eval_every": 4,  # Evaluating 6 views an image is a large part of an epoch: every 4th epoch and the last.
    }
    return config
