"""cifar_jax's training against PyTorch's (the original's framework): initial weights, the one-cycle schedule and its
momentum, and whole train steps from the same weights on the same batches. Skipped where torch is not installed."""

import contextlib
import functools
import sys

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cifar_jax import train_lib
from cifar_jax.augment import normalize
from cifar_jax.config import apply_overrides, base_config, validate
from cifar_jax.models import get_model
from tests.conftest import ROOT

torch = pytest.importorskip("torch")
sys.path.insert(0, str(ROOT / "benchmarks"))
from _torch_resnet import ResNet18, load_flax_variables  # noqa: E402
import torch_reference  # noqa: E402


def flax_weights(init: str, width: int, seed: int = 0) -> dict:
    """{"layer1.block0.conv1.weight": array, ...} of a freshly initialised Flax ResNet18, named as in PyTorch."""
    model = get_model("resnet18", width=width, weight_init=init)
    params = model.init(jax.random.key(seed), np.zeros((1, 32, 32, 3), np.float32))["params"]
    names = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    return {".".join(path[:-1]) + "." + names[path[-1]]: np.asarray(v) for path, v in flatten_dict(params).items()}


def test_pytorch_init_draws_what_pytorch_draws():
    """Per layer, model.init="pytorch" has the std and the range of PyTorch's default init for the same shapes."""
    ours = flax_weights("pytorch", width=32)
    torch.manual_seed(0)
    theirs = {k: v.detach().numpy() for k, v in ResNet18(32).state_dict().items() if k in ours}
    assert theirs.keys() == ours.keys()
    weights = [k for k in ours if k.endswith(".weight") and ("conv" in k or k.startswith("head"))]
    assert len(weights) == 21  # 20 convolutions and the head.
    for name in weights:
        w, ref = ours[name], theirs[name]
        fan_in = ref[0].size  # PyTorch's (out, in, kh, kw) and (out, in): everything but the first axis.
        bound = 1 / np.sqrt(fan_in)
        assert bound * 0.9 < np.abs(w).max() <= bound * (1 + 1e-6), name  # U(-bound, bound)...
        assert w.std() == pytest.approx(ref.std(), rel=0.05 if w.size >= 4096 else 0.2), name  # ...like PyTorch's
    bias, ref_bias = ours["head.bias"], theirs["head.bias"]
    bound = 1 / np.sqrt(256)
    assert np.abs(bias).max() <= bound and np.abs(ref_bias).max() <= bound and np.abs(bias).max() > 0.3 * bound
    # BatchNorm starts at scale 1, bias 0 in both.
    assert all(np.all(ours[k] == (1 if k.endswith("weight") else 0)) for k in ours if "bn" in k)


def test_one_cycle_lr_and_momentum_are_pytorch_s_step_for_step():
    optim = apply_overrides(base_config(), ["optim.momentum_range=(0.85, 0.95)", "optim.warmup_fraction=0.3"]).optim
    total = 97  # warmup_fraction * total is not a whole number of steps.
    model = torch.nn.Linear(1, 1)
    opt, scheduler = torch_reference.make_optimizer(model, optim, total)
    lr_ref, momentum_ref = [], []
    for _ in range(total):
        lr_ref.append(opt.param_groups[0]["lr"])
        momentum_ref.append(opt.param_groups[0]["momentum"])
        opt.step()
        scheduler.step()
    lrs = np.array([float(train_lib.make_schedule(optim, total)(i)) for i in range(total)])
    momenta = np.array([float(train_lib.one_cycle(total, 0.3, 0.95, 0.85, 0.95)(i)) for i in range(total)])
    np.testing.assert_allclose(lrs, lr_ref, rtol=2e-6, atol=1e-8)  # float32 against Python's float64
    np.testing.assert_allclose(momenta, momentum_ref, rtol=2e-6)
    assert int(np.argmax(lrs)) == 28 and int(np.argmin(momenta)) == 28  # PyTorch's peak: step 0.3 * 97 - 1, rounded


# The spatial size of each stage's BatchNorm inputs (32x32 images): the n of the batch variance.
SIDE = {"stem": 32, "layer1": 32, "layer2": 16, "layer3": 8, "layer4": 4}


@pytest.mark.parametrize("overrides,wrong", [
    # PyTorch's OneCycleLR defaults (momentum cycled 0.95 -> 0.85 -> 0.95) and label smoothing; checked against
    # PyTorch run with a constant momentum instead, which must not pass.
    (["optim.momentum_range=(0.85, 0.95)", "optim.label_smoothing=0.1"], ["optim.momentum_range=()"]),
    # cifar_jax's default (constant momentum 0.9); PyTorch with label smoothing must not pass.
    (["optim.momentum_range=()"], ["optim.label_smoothing=0.1"]),
])
def test_train_steps_match_pytorch_from_the_same_weights(overrides, wrong):
    """Our train step and torch.optim.SGD(nesterov, weight_decay) + OneCycleLR, K steps from the same weights on the
    same batches (no augmentation), end at the same parameters and BatchNorm statistics: the loss, label smoothing,
    weight decay, Nesterov momentum, its cycle, the schedule and BatchNorm's momentum are PyTorch's.

    In float64, on the same (float32) normalised images; our logits and loss stay float32, a floor of ~1e-7 (measured:
    at most 2.2e-7 for any tensor, against 0.55-0.68 overall for the wrong setting). In float32 the two cannot be
    compared past two steps: at lr 0.2 a 1e-7 change of a width-8 net's weights or images grows 10-100x a step, in
    PyTorch against itself too.
    """
    config = apply_overrides(base_config(), ["model.width=4", "optim.lr=0.2", *overrides])
    validate(config)
    steps, total, batch = 5, 100, 16
    with jax.enable_x64(True):
        model = get_model("resnet18", width=4, weight_init=config.model.init, dtype=jax.numpy.float64)
        variables = jax.tree.map(lambda v: v.astype(np.float64), model.init(jax.random.key(0), np.zeros((1, 32, 32, 3))))
        state = train_lib.TrainState.create(apply_fn=model.apply, params=variables["params"], rng=jax.random.key(1),
                                            batch_stats=variables["batch_stats"], tx=train_lib.make_optimizer(config.optim, total))
        start = _torch_copy(state).state_dict()
        references = {key: _torch_copy(state) for key in ("same", "wrong")}
        optims = {"same": config.optim, "wrong": apply_overrides(config, wrong).optim}
        optimizers = {key: torch_reference.make_optimizer(references[key], optims[key], total) for key in references}
        rng = np.random.default_rng(0)
        mean, std = np.array([0.49, 0.48, 0.45]), np.array([0.25, 0.24, 0.26])
        step = jax.jit(functools.partial(train_lib.train_step, aug=dict(crop_padding=0, pad_mode="reflect", flip=False,
                                                                         cutout_size=0),
                                         label_smoothing=config.optim.label_smoothing))
        for _ in range(steps):
            images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, (batch,)).astype(np.int32)
            state, _ = step(state, images, labels, mean, std)
            x = torch.from_numpy(np.asarray(normalize(images, mean, std), np.float64).transpose(0, 3, 1, 2).copy())
            for key, reference in references.items():
                reference.train()
                torch_reference.train_step(reference, *optimizers[key], x, torch.from_numpy(labels.astype(np.int64)),
                                           optims[key].label_smoothing, contextlib.nullcontext)
        ours = _torch_copy(state).state_dict()
    same, wrong = (_differences(ours, references[key].state_dict(), start, batch, steps) for key in ("same", "wrong"))
    assert len(same) == 103  # 62 parameters, 40 running statistics, and "all".
    worst = max(same, key=same.get)
    assert same[worst] < 1e-5, (worst, same[worst])
    assert wrong["all"] > 1e-3  # The comparison tells the settings apart.


def _differences(ours: dict, theirs: dict, start: dict, batch: int, steps: int) -> dict:
    """{tensor name: |ours - theirs| / |theirs - start|} (of what the steps changed), and "all" over the parameters."""
    out, num, den = {}, 0.0, 0.0
    for name, value in ours.items():
        if name.endswith("num_batches_tracked"):
            continue
        a, b, s0 = (t[name].numpy().astype(np.float64) for t in (ours, theirs, start))
        if name.endswith("running_var"):
            # The one difference: PyTorch's running variance averages the unbiased batch variance (n / (n - 1)),
            # Flax's the biased one. Both start at 1 and average linearly, so PyTorch's factor comes off exactly.
            n = batch * SIDE[name.split(".")[0].split("_")[0]] ** 2  # Every BatchNorm of a stage sees its output size.
            b = 0.9**steps + (b - 0.9**steps) * (n - 1) / n
        out[name] = np.linalg.norm(a - b) / np.linalg.norm(b - s0)
        if not name.startswith("running", name.rfind(".") + 1):
            num, den = num + np.sum((a - b) ** 2), den + np.sum((b - s0) ** 2)
    return {**out, "all": np.sqrt(num / den)}


def _torch_copy(state) -> ResNet18:
    """A float64 PyTorch ResNet18 holding ``state``'s parameters and BatchNorm statistics."""
    model = ResNet18(state.params["stem_conv"]["kernel"].shape[-1]).double()
    load_flax_variables(model, {"params": state.params, "batch_stats": state.batch_stats}, np.float64)
    return model


def test_reference_augmentation_is_ours():
    """The reference trainer's crop, mirror and cutout draw what cifar_jax.augment draws: every output image is the
    padded original at an offset in [0, 2p] (mirrored or not), with one cutout square of zeros, clipped by the border."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 3, 32, 32)).astype(np.float32)
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])
    out = torch_reference.augment(torch.from_numpy(images), torch.Generator().manual_seed(0), mean, std,
                                  crop_padding=4, pad_mode="reflect", flip=True, cutout=8).numpy()
    padded = np.pad((images / 255.0 - 0.5) / 0.25, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    offsets, mirrored = set(), 0
    for n in range(64):
        kept = out[n] != 0  # outside the cutout square (a normalised pixel is never exactly 0 here)
        rows, cols = np.nonzero(~kept[0])
        assert 0 < len(rows) <= 64 and np.all(~kept[:, rows, cols])  # one square, all channels
        assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
        found = [(i, j, m) for i in range(9) for j in range(9) for m in (False, True)
                 if np.allclose((lambda c: c[:, :, ::-1] if m else c)(padded[n, :, i:i + 32, j:j + 32])[kept],
                                out[n][kept], atol=1e-5)]
        assert found, n
        offsets.add(found[0][:2])
        mirrored += found[0][2]
    assert len(offsets) > 20 and 16 < mirrored < 48  # the draws vary
