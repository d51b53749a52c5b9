"""Config files (``get_config()`` -> ConfigDict), ``--config.a.b=value`` overrides, validation.

``base_config()`` holds every field with its default and a comment; ``RULES`` declares
what each field may hold, and ``validate`` checks all of them in one place before any
compute. Hand-written rather than absl's ``config_flags`` because that prints a traceback
for an unknown field; here every mistake is a one-line ConfigError.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections

from cifar_jax.dataset import DEFAULT_PATH
from cifar_jax.errors import ConfigError, UserError  # noqa: F401  (ConfigError is part of this module's API)
from cifar_jax.data import SOURCES
from cifar_jax.models import INITS, MODELS, NORMS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("auto", *SOURCES)
PAD_MODES = ("reflect", "constant", "edge", "symmetric")
AUTO_FLOAT32 = "auto_float32"  # The group of fields a config sets for when model.dtype=auto resolves to float32.


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its ``get_config()``, unlocked for overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist{_configs_beside(path)}")
    spec = importlib.util.spec_from_file_location(f"_cifar_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"config file {str(path)!r} failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} has no get_config()")
    try:
        config = module.get_config()
    except Exception as e:
        raise ConfigError(f"get_config() in {str(path)!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {str(path)!r} must return an ml_collections.ConfigDict")
    return config


def _configs_beside(path: Path) -> str:
    """What to say after "config file PATH does not exist": a close name and the configs in its folder ("" if none)."""
    try:
        names = sorted(p.name for p in path.parent.glob("*.py") if not p.name.startswith("_"))
    except OSError:
        return ""
    if not names:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    guess = f"; did you mean {str(path.parent / close[0])!r}?" if close else ""
    return f"{guess} (configs in {str(path.parent)!r}: {', '.join(names)})"


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ``["a.b=value", ...]``; values are parsed to the existing field's type.

    Raises ConfigError for an unknown field or a value of the wrong type.
    """
    config = ml_collections.ConfigDict(config.to_dict())  # A fresh copy; the caller's stays as it was.
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like --config.field=value")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                guess = _did_you_mean(dotted, flatten(config))
                raise ConfigError(f"unknown config field {'.'.join(parents[: i + 1])!r} in --config.{dotted}{guess}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"unknown config field {dotted!r}{_did_you_mean(dotted, flatten(config))}")
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config field {dotted!r} is a group; set one of its fields")
        node[leaf] = _parse_like(raw, current, dotted)
    return config


def _parse_like(raw: str, current, name: str):
    try:
        if isinstance(current, bool):
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(raw)
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return type(current)(value)
        if current is None:
            try:
                return ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return raw
        return raw
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{name}={raw!r}: expected a {type(current).__name__}") from None


class Rule:
    """A declared constraint on one config field: ``ok(value)`` and a phrase for the error."""

    def __init__(self, ok: Callable[[Any], bool], phrase: str, choices: Sequence[str] = ()):
        self.ok, self.phrase, self.choices = ok, phrase, tuple(choices)

    def check(self, name: str, value) -> None:
        """Raises ConfigError naming the field, the value and what is allowed."""
        try:
            good = self.ok(value)
        except TypeError:
            good = False
        if good:
            return
        if self.choices:
            raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(self.choices)}")
        raise ConfigError(f"{name} must be {self.phrase}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    """An int in [lo, hi] (either end open-ended when None)."""
    phrase = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + (
        f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")
    return Rule(lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi), phrase)


def real(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False) -> Rule:
    """A finite number in the interval, each end closed unless ``*_open`` (NaN and inf always refused)."""
    def ok(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))

    left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    if lo is not None and hi is not None:
        phrase = f"a finite number in {left}, {right}"
    elif lo is not None:
        phrase = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        phrase = "a finite number"
    return Rule(ok, phrase)


def choice(*options: str) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(options), options)


BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
TEXT = Rule(lambda v: isinstance(v, str), "a string")

# Every field of base_config() and what it may hold; ``validate`` checks all of them.
RULES: dict[str, Rule] = {
    "seed": integer(0, 2**31 - 1),
    "epochs": integer(1),
    "batch_size": integer(1),
    "eval_batch_size": integer(1),
    "steps_per_dispatch": integer(0),
    "loop": choice("auto", "host", "device"),
    "cpu_devices": integer(0),
    "fresh": BOOL,
    "eval_flip": BOOL,
    "eval_translate": integer(0, 8),
    "eval_every": integer(1),
    "model.name": choice(*MODELS),
    "model.width": integer(1),
    "model.dtype": choice("auto", *DTYPES),
    "model.norm_dtype": choice("same", *DTYPES),
    "model.norm_backward": choice(*NORMS),
    "model.zero_init_residual": BOOL,
    "model.init": choice(*INITS),
    "model.conv": choice("auto", "xla", "onednn"),
    "data.source": choice(*DATA_SOURCES),
    "data.path": TEXT,
    "data.name": TEXT,
    "data.label_mode": choice("fine", "coarse"),
    "data.download": BOOL,
    "data.url": TEXT,
    "data.image_size": integer(8, 1024),
    "data.cache": BOOL,
    "data.max_train": integer(0),
    "data.max_test": integer(0),
    "augment.crop_padding": integer(0),
    "augment.pad_mode": choice(*PAD_MODES),
    "augment.flip": BOOL,
    "augment.cutout": integer(0),
    "optim.name": choice(*OPTIMIZERS),
    "optim.lr": real(0, lo_open=True),
    "optim.momentum": real(0, 1, hi_open=True),
    "optim.nesterov": BOOL,
    "optim.weight_decay": real(0),
    "optim.schedule": choice(*SCHEDULES),
    "optim.warmup_fraction": real(0, 1, lo_open=True, hi_open=True),
    "optim.div_factor": real(0, lo_open=True),
    "optim.final_div_factor": real(0, lo_open=True),
    "optim.label_smoothing": real(0, 1, hi_open=True),
    "optim.momentum_range": Rule(
        lambda v: isinstance(v, (tuple, list)) and (len(v) == 0 or (
            len(v) == 2 and all(real(0, 1, hi_open=True).ok(m) for m in v) and v[0] <= v[1])),
        "() or (base, max) momenta in [0, 1) with base <= max"),
    "checkpoint.every_epochs": integer(0),
    "checkpoint.keep": integer(1),
    "log.progress_bar": BOOL,
    "log.tensorboard": BOOL,
    "log.report": BOOL,
    "distributed.coordinator_address": TEXT,
    "distributed.num_processes": integer(1),
    "distributed.process_id": integer(0),
}


def flatten(config, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a ConfigDict."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _path_exists(field: str, path: str) -> bool:
    """Whether ``path`` exists; a path the OS refuses to look up (a name too long, no permission) is a ConfigError."""
    try:
        return Path(path).exists()
    except OSError as e:
        raise ConfigError(f"{field} {path!r} cannot be used: {e.strerror or e}") from None


def validate(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
    """Checks every field against ``RULES`` and the fields against each other, before any compute.

    Raises ConfigError naming the first bad field (or an unknown one, with "did you mean").
    """
    fields = flatten(config)
    for name, value in fields.items():
        if name.startswith(AUTO_FLOAT32 + "."):  # A field to set when model.dtype=auto resolves to float32.
            name = name[len(AUTO_FLOAT32) + 1:]
            if name not in RULES or name == "model.dtype":
                raise ConfigError(f"unknown config field {name!r} in {AUTO_FLOAT32}{_did_you_mean(name, RULES)}")
            RULES[name].check(f"{AUTO_FLOAT32}.{name}", value)
            continue
        if name not in RULES:
            raise ConfigError(f"unknown config field {name!r}{_did_you_mean(name, RULES)}")
        RULES[name].check(name, value)
    missing = sorted(set(RULES) - set(fields))
    if missing:
        raise ConfigError(f"config is missing field(s) {', '.join(missing)}; start get_config() from base_config()")
    c = config
    cross = [
        (c.batch_size % device_count == 0, f"batch_size {c.batch_size} is not divisible by the {device_count} devices"),
        (c.distributed.process_id < c.distributed.num_processes,
         f"distributed.process_id {c.distributed.process_id} must be < distributed.num_processes {c.distributed.num_processes}"),
        (c.augment.pad_mode != "reflect" or c.augment.crop_padding < c.data.image_size,
         f"augment.crop_padding {c.augment.crop_padding} must be < data.image_size {c.data.image_size} for reflect padding"),
        (c.eval_translate < c.data.image_size,
         f"eval_translate {c.eval_translate} must be < data.image_size {c.data.image_size} (reflect padding)"),
        (c.data.source != "folder" or bool(c.data.path), "data.path is empty: give the image-folder tree or its .tar.gz"),
        (c.data.source != "folder" or _path_exists("data.path", c.data.path), f"data.path {c.data.path!r} does not exist"),
        (  # A mistyped path is an error, not a silent download; only the default (or "") may be missing.
            c.data.source != "auto" or c.data.path in ("", DEFAULT_PATH) or _path_exists("data.path", c.data.path),
            f"data.path {c.data.path!r} does not exist (data.source=auto falls back to cifar10 only for the default path)",
        ),
        (not c.optim.momentum_range or (c.optim.name == "sgd" and c.optim.schedule == "onecycle"),
         f"optim.momentum_range {tuple(c.optim.momentum_range)!r} needs optim.name='sgd' and optim.schedule='onecycle'"),
        (c.data.label_mode == "fine" or c.data.source == "cifar100",
         f"data.label_mode='coarse' needs data.source='cifar100', got {c.data.source!r}"),
    ]
    for ok, message in cross:
        if not ok:
            raise ConfigError(message)


def resolve_dtype(config: ml_collections.ConfigDict, dtype: str, why: str, keep=()) -> str:
    """Resolves ``model.dtype="auto"`` to ``dtype`` in place; returns the one line that says so.

    When it resolves to float32 the fields of ``auto_float32`` are set too, except those in ``keep`` (dotted names
    given on the command line, which win). A concrete ``model.dtype`` is left alone (returns "").
    """
    if config.model.dtype != "auto":
        return ""
    config.model.dtype = dtype
    line = f"model.dtype=auto -> {dtype} ({why})"
    if dtype == "float32":
        changed = {n: v for n, v in flatten(config.get(AUTO_FLOAT32, ml_collections.ConfigDict())).items() if n not in keep}
        for name, value in changed.items():
            *groups, leaf = name.split(".")
            node = config
            for g in groups:
                node = node[g]
            node[leaf] = value
        if changed:
            line += f"; {AUTO_FLOAT32} sets " + ", ".join(f"{n}={v!r}" for n, v in changed.items())
    return line


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe_fields(config: ml_collections.ConfigDict | None = None) -> str:
    """One line per field: ``name = default  (allowed values)``, for ``train --help``."""
    fields = flatten(base_config() if config is None else config)
    width = max(len(n) + len(repr(v)) for n, v in fields.items()) + 3
    return "\n".join(f"  {f'{n} = {v!r}':<{width}} {RULES[n].phrase if n in RULES else ''}" for n, v in fields.items())


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with its default; experiment files start from this and set what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Initialisation, data order and augmentation are pure functions of it: same seed, same run.
    c.epochs = 20  # Passes over the training set.
    c.batch_size = 512  # Global batch, summed over devices and hosts; must divide by the device count.
    c.eval_batch_size = 1000  # Test-set batch; memory only, results do not depend on it.
    # "host": gather each batch on the host and send it (CPU default); "device": upload the uint8
    # dataset once and gather/augment/train on the accelerator (GPU/TPU default); "auto" picks by platform.
    c.loop = "auto"
    c.steps_per_dispatch = 0  # Train steps per compiled call (host reads metrics once per call); 0 = 1 on CPU, 20 elsewhere.
    # CPU only: split the host into this many JAX devices, so XLA runs the data-parallel shards
    # side by side (2 on 2 cores: 1.27x images/s, docs/benchmarks.md); 0 keeps JAX's default (1).
    c.cpu_devices = 0
    c.fresh = False  # True: delete the checkpoints already in the workdir and start over.
    c.eval_flip = False  # Test-time augmentation: average the logits of the image and its mirror.
    # More test-time augmentation (airbench's): also average (half weight) the views of the image shifted this many
    # pixels up-left and down-right; 0 = off. 3x the evaluation's cost (with eval_flip: 6 forward passes an image).
    c.eval_translate = 0
    # Evaluate on the test set every N epochs and after the last; epochs between have no test metrics (and cannot
    # be the best checkpoint). Evaluation is ~10% of a CPU epoch with eval_flip; more with eval_translate.
    c.eval_every = 1

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"  # A key of cifar_jax.models.MODELS.
    c.model.width = 64  # Channels of the stem and first stage (64 = the original, 11,173,962 parameters).
    # Compute dtype; parameters and logits stay float32. "auto", resolved at startup (one printed line, kept in the
    # workdir's config.json and by a resumed run): bfloat16 where it is fast (a GPU/TPU, or a CPU with AVX512-BF16 or
    # AMX and the oneDNN extension), else float32 with the fields of auto_float32.
    c.model.dtype = "float32"
    # BatchNorm's compute dtype: "same" as model.dtype, or e.g. float32 around bfloat16 convolutions (XLA:CPU's
    # BatchNorm on bfloat16 is slow: docs/benchmarks.md).
    c.model.norm_dtype = "same"
    # BatchNorm's training gradient: "autodiff" (nn.BatchNorm) or "closed_form" (cifar_jax.models.batchnorm: two
    # per-channel sums and one elementwise pass; same forward, equal within float tolerance; docs/benchmarks.md).
    c.model.norm_backward = "autodiff"
    c.model.zero_init_residual = False  # Start each block's last BatchNorm scale at 0 (the block begins as identity).
    # Initial weights: "pytorch" (the original's: PyTorch's default for every conv and the head, U(+-1/sqrt(fan_in)))
    # or "he" (torchvision's He-normal fan_out convs, 2.45x larger); cifar_jax.models.resnet.INITS, docs/recipes.md.
    c.model.init = "pytorch"
    # Convolution kernels for training: "onednn" (cifar_jax.onednn; needs pip install -e ".[onednn]" and a C++
    # compiler; 2-3x XLA's images/s on CPU, docs/benchmarks.md), "xla", or "auto" = onednn when it is
    # installed, the backend is one CPU device and the model float32 (or bfloat16 on a CPU with AVX512-BF16
    # or AMX), else xla. Same parameters either way.
    c.model.conv = "auto"
    # Fields set when model.dtype="auto" resolves to float32, as a nested group (e.g. {"model": {"width": 16}}):
    # a recipe's settings for CPUs without native bfloat16. Command-line overrides win over them.
    c.auto_float32 = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"  # auto (folder at path if it exists, else cifar10), folder, cifar10, cifar100, tfds.
    c.data.path = DEFAULT_PATH  # ../shared/data/cifar10-jpg.tar.gz. Folder/archive for folder; the archive (or its folder) for cifar10/100; data_dir for tfds.
    c.data.name = "cifar10"  # tfds dataset name.
    c.data.label_mode = "fine"  # cifar100 only: "fine" (100 classes) or "coarse" (20 superclasses).
    c.data.download = True  # cifar10/cifar100: fetch the official archive into the cache dir if missing.
    c.data.url = ""  # Base URL of the archives; empty: $CIFAR_JAX_DATA_URL or https://www.cs.toronto.edu/~kriz.
    c.data.image_size = 32  # Images are resized to this square size when decoded.
    c.data.cache = True  # Keep decoded arrays in the cache dir (~/.cache/cifar_jax) for fast restarts.
    c.data.max_train = 0  # 0 = all images; otherwise a class-balanced subset (tests, quick looks).
    c.data.max_test = 0  # Likewise for the test set.

    c.augment = ml_collections.ConfigDict()
    c.augment.crop_padding = 4  # Random crop after padding by this many pixels; 0 = no crop.
    c.augment.pad_mode = "reflect"  # How the crop pads: reflect, constant (zeros), edge, symmetric.
    c.augment.flip = True  # Random left-right mirror.
    c.augment.cutout = 16  # Side of the zeroed square (DeVries & Taylor 2017); 0 = off.

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # sgd (coupled L2 decay as in PyTorch), adam (L2) or adamw (decoupled).
    c.optim.lr = 0.1  # Peak learning rate of the schedule.
    c.optim.momentum = 0.9  # SGD momentum; 0 = plain SGD.
    c.optim.nesterov = True  # Nesterov momentum (SGD only).
    c.optim.weight_decay = 5e-4  # L2 penalty (coupled for sgd/adam, decoupled for adamw).
    c.optim.schedule = "onecycle"  # onecycle (cosine up, then down), linear (straight up, then down), cosine (decay only) or constant.
    c.optim.warmup_fraction = 0.25  # onecycle/linear: fraction of the steps spent rising to the peak.
    c.optim.div_factor = 25.0  # onecycle/linear: the first lr is lr / div_factor.
    c.optim.final_div_factor = 1e4  # onecycle/linear: the last lr is lr / div_factor / final_div_factor.
    c.optim.label_smoothing = 0.0  # Mass spread uniformly over all classes in the training targets.
    # onecycle + sgd: (base, max) momentum cycled inversely to the lr (max at the ends, base at the peak), replacing
    # optim.momentum, as PyTorch's OneCycleLR does by default with (0.85, 0.95); () = constant optim.momentum.
    c.optim.momentum_range = ()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_epochs = 1  # Save every N epochs (and always at the end and on SIGINT/SIGTERM); 0 = end only.
    c.checkpoint.keep = 2  # Most recent checkpoints kept, plus the best by test accuracy.

    c.log = ml_collections.ConfigDict()
    c.log.progress_bar = True  # tqdm bar per epoch.
    c.log.tensorboard = False  # Also write scalars for TensorBoard (needs tensorboardX).
    c.log.report = True  # Build REPORT.md and plots at the end of training.

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # e.g. "10.0.0.1:1234"; empty = single process.
    c.distributed.num_processes = 1  # Hosts in the job.
    c.distributed.process_id = 0  # This host's index, 0..num_processes-1.
    return c
