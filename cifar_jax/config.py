"""Config files (``get_config()`` -> ConfigDict), ``--config.a.b=value`` overrides, validation.

Hand-written rather than absl's ``config_flags`` because that prints a
traceback for an unknown field; here every mistake is a one-line ConfigError.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config file or override that cannot be used (one-line message)."""


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its ``get_config()``, unlocked for overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_cifar_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"config file {str(path)!r} failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} has no get_config()")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {str(path)!r} must return an ml_collections.ConfigDict")
    return config


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
                raise ConfigError(f"unknown config field {'.'.join(parents[: i + 1])!r} in --config.{dotted}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"unknown config field {dotted!r}")
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


def validate(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
    """Checks values before any compute; raises ConfigError naming the first bad field."""
    checks = [
        (config.epochs > 0, f"epochs must be positive, got {config.epochs}"),
        (config.batch_size > 0, f"batch_size must be positive, got {config.batch_size}"),
        (
            config.batch_size % device_count == 0,
            f"batch_size {config.batch_size} is not divisible by the {device_count} devices",
        ),
        (config.eval_batch_size > 0, f"eval_batch_size must be positive, got {config.eval_batch_size}"),
        (config.model.width > 0, f"model.width must be positive, got {config.model.width}"),
        (config.model.dtype in DTYPES, f"unknown model.dtype {config.model.dtype!r}; choose one of {', '.join(DTYPES)}"),
        (config.optim.name in OPTIMIZERS, f"unknown optim.name {config.optim.name!r}; choose one of {', '.join(OPTIMIZERS)}"),
        (config.optim.schedule in SCHEDULES, f"unknown optim.schedule {config.optim.schedule!r}; choose one of {', '.join(SCHEDULES)}"),
        (config.optim.lr > 0, f"optim.lr must be positive, got {config.optim.lr}"),
        (0 <= config.optim.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {config.optim.label_smoothing}"),
        (
            config.data.source in ("auto", "folder", "cifar10", "cifar100", "tfds"),
            f"unknown data.source {config.data.source!r}; choose auto, folder, cifar10, cifar100 or tfds",
        ),
        (config.data.label_mode in ("fine", "coarse"), f"unknown data.label_mode {config.data.label_mode!r}; choose 'fine' or 'coarse'"),
        (
            config.data.label_mode == "fine" or config.data.source == "cifar100",
            f"data.label_mode='coarse' needs data.source='cifar100', got {config.data.source!r}",
        ),
        (config.data.source != "folder" or bool(config.data.path), "data.path is empty: give the image-folder tree or its .tar.gz"),
        (
            config.data.source != "folder" or Path(config.data.path).exists(),
            f"data.path {config.data.path!r} does not exist",
        ),
        (  # A mistyped path is an error, not a silent download; only the default (or "") may be missing.
            config.data.source != "auto" or Path(config.data.path).exists() or config.data.path in ("", base_config().data.path),
            f"data.path {config.data.path!r} does not exist (data.source=auto falls back to cifar10 only for the default path)",
        ),
        (config.checkpoint.every_epochs >= 0, "checkpoint.every_epochs must be >= 0"),
        (config.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {config.checkpoint.keep}"),
        (config.steps_per_dispatch >= 1, f"steps_per_dispatch must be >= 1, got {config.steps_per_dispatch}"),
        (config.cpu_devices >= 0, f"cpu_devices must be >= 0, got {config.cpu_devices}"),
    ]
    from cifar_jax.models import MODELS

    checks.insert(0, (config.model.name.lower() in MODELS, f"unknown model.name {config.model.name!r}; choose one of {', '.join(sorted(MODELS))}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with defaults; experiment files start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.epochs = 20
    c.batch_size = 512
    c.eval_batch_size = 1000
    c.steps_per_dispatch = 1  # Train steps fused into one compiled call with lax.scan.
    # CPU only: split the host into this many JAX devices, so XLA runs the data-parallel shards
    # side by side (2 on 2 cores: 1.27x images/s, docs/benchmarks.md); 0 keeps JAX's default (1).
    c.cpu_devices = 0
    c.fresh = False  # True: ignore (and replace) checkpoints already in the workdir.
    c.eval_flip = False  # Test-time augmentation: average logits of the image and its mirror.

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"
    c.model.width = 64
    c.model.dtype = "float32"
    c.model.zero_init_residual = False

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"  # auto (folder at path if it exists, else cifar10), folder, cifar10, cifar100, tfds.
    c.data.path = "../shared/data/cifar10-jpg.tar.gz"
    c.data.name = "cifar10"
    c.data.label_mode = "fine"  # cifar100 only: "fine" (100 classes) or "coarse" (20 superclasses).
    c.data.download = True  # cifar10/cifar100: fetch the official archive into the cache dir if missing.
    c.data.url = ""  # Base URL of the archives; empty: $CIFAR_JAX_DATA_URL or https://www.cs.toronto.edu/~kriz.
    c.data.image_size = 32
    c.data.cache = True
    c.data.max_train = 0  # 0 = all images; otherwise a class-balanced subset.
    c.data.max_test = 0

    c.augment = ml_collections.ConfigDict()
    c.augment.crop_padding = 4
    c.augment.pad_mode = "reflect"
    c.augment.flip = True
    c.augment.cutout = 16

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"
    c.optim.lr = 0.1  # Peak learning rate of the schedule.
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "onecycle"
    c.optim.warmup_fraction = 0.25
    c.optim.div_factor = 25.0
    c.optim.final_div_factor = 1e4
    c.optim.label_smoothing = 0.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_epochs = 1
    c.checkpoint.keep = 2

    c.log = ml_collections.ConfigDict()
    c.log.progress_bar = True
    c.log.tensorboard = False
    c.log.report = True  # Build REPORT.md and plots at the end of training.

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # e.g. "10.0.0.1:1234"; empty = single process.
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    return c
