import pytest

from cifar_jax.config import ConfigError, apply_overrides, base_config, load_config, resolve_dtype, validate
from tests.conftest import ROOT, run_module


def test_overrides_are_parsed_to_the_field_type():
    c = apply_overrides(base_config(), ["epochs=3", "optim.lr=0.5", "augment.flip=false", "model.name=resnet34"])
    assert c.epochs == 3 and isinstance(c.epochs, int)
    assert c.optim.lr == 0.5 and c.augment.flip is False and c.model.name == "resnet34"
    assert base_config().epochs == 20  # the original is untouched


@pytest.mark.parametrize(
    "override,message",
    [
        ("epochz=3", "unknown config field 'epochz'"),
        ("optim.lrr=1", "unknown config field 'optim.lrr'"),
        ("nothing.lr=1", "unknown config field 'nothing'"),
        ("epochs=three", "expected a int"),
        ("augment.flip=maybe", "expected a bool"),
        ("optim=1", "is a group"),
        ("epochs", "must look like"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(base_config(), [override])


@pytest.mark.parametrize(
    "override,devices,message",
    [
        ("epochs=0", 1, "epochs must be an integer >= 1, got 0"),
        ("batch_size=100", 3, "not divisible by the 3 devices"),
        ("optim.name=rmsprop", 1, "unknown optim.name 'rmsprop'"),
        ("data.path=/no/such/place", 1, "does not exist"),
        ("model.name=vgg", 1, "unknown model.name 'vgg'"),
        ("optim.schedule=step", 1, "unknown optim.schedule"),
        ("eval_every=0", 1, "eval_every must be an integer >= 1, got 0"),
        ("eval_translate=9", 1, r"eval_translate must be an integer in \[0, 8\], got 9"),
        ("model.norm_dtype=int8", 1, "unknown model.norm_dtype 'int8'; choose one of same, float32"),
        ("model.norm_backward=manual", 1, "unknown model.norm_backward 'manual'; choose one of autodiff, closed_form"),
    ],
)
def test_bad_values_are_rejected_before_compute(override, devices, message, cifar_archive):
    config = apply_overrides(base_config(), [f"data.path={cifar_archive}", override])
    with pytest.raises(ConfigError, match=message):
        validate(config, devices)


@pytest.mark.parametrize("name", ["resnet18.py", "resnet18_cpu.py", "smoke.py"])
def test_experiment_configs_load_and_validate(name, cifar_archive):
    config = load_config(ROOT / "experiments" / name)
    config.data.path = str(cifar_archive)
    validate(config)
    assert f"python -m cifar_jax.train --config experiments/{name}" in (ROOT / "experiments" / name).read_text()


def test_cpu_recipe_resolves_to_the_bfloat16_or_the_float32_recipe():
    config = load_config(ROOT / "experiments" / "resnet18_cpu.py")
    assert config.model.dtype == "auto"
    bf16 = load_config(ROOT / "experiments" / "resnet18_cpu.py")
    assert resolve_dtype(bf16, "bfloat16", "why") == "model.dtype=auto -> bfloat16 (why)"
    assert (bf16.model.dtype, bf16.model.width, bf16.epochs, bf16.batch_size, bf16.eval_translate) == ("bfloat16", 24, 21, 256, 0)
    line = resolve_dtype(config, "float32", "why", keep={"epochs"})  # a command-line override wins
    assert (config.model.dtype, config.model.width, config.epochs, config.batch_size) == ("float32", 16, 21, 128)
    assert (config.optim.lr, config.eval_translate, config.eval_every) == (0.1, 1, 4)
    assert "model.width=16" in line and "epochs" not in line
    assert resolve_dtype(config, "bfloat16", "why") == ""  # resolved once: a concrete dtype stays


def test_auto_float32_fields_are_validated(cifar_archive):
    config = load_config(ROOT / "experiments" / "resnet18_cpu.py")
    config.data.path = str(cifar_archive)
    config.auto_float32.model.width = 0
    with pytest.raises(ConfigError, match="auto_float32.model.width must be an integer >= 1"):
        validate(config)
    config.auto_float32 = {"model": {"widht": 16}}
    with pytest.raises(ConfigError, match="unknown config field 'model.widht' in auto_float32"):
        validate(config)


def test_gpu_recipe_keeps_the_original_model_and_budget():
    c = load_config(ROOT / "experiments" / "resnet18.py")
    assert (c.model.name, c.model.width, c.epochs, c.batch_size) == ("resnet18", 64, 20, 512)
    assert c.optim.schedule == "onecycle" and c.optim.nesterov
    assert c.augment.crop_padding == 4 and c.augment.flip and c.augment.cutout == 8 and c.optim.label_smoothing == 0.1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config", "experiments/nope.py"], "config file 'experiments/nope.py' does not exist"),
        (["--config", "experiments/resnet18-cpu.py"], "did you mean 'experiments/resnet18_cpu.py'? (configs in "
                                                      "'experiments': resnet18.py, resnet18_cifar100.py, resnet18_cpu.py, smoke.py)"),
        (["--config", "experiments/smoke.py", "--config.epochz=1"], "unknown config field 'epochz'"),
        (["--config", "experiments/smoke.py", "--config.epochs=0"], "epochs must be an integer >= 1"),
        (["--config", "experiments/smoke.py", "--config.data.path=/nowhere.tar.gz"], "does not exist"),
    ],
)
def test_cli_reports_bad_config_in_one_line(args, message, tmp_path, capsys):
    from cifar_jax import train

    assert train.main([*args, "--workdir", str(tmp_path / "w")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and message in lines[-1], err
    assert not (tmp_path / "w").exists()  # nothing computed, nothing written


def test_a_bad_config_exits_the_process_with_one_line_and_status_2(tmp_path):
    """The same as a process: its exit status and all it prints (the cases above run in this process)."""
    result = run_module("cifar_jax.train", "--config", "experiments/smoke.py", "--config.epochz=1",
                        "--workdir", str(tmp_path / "w"), timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == ["error: unknown config field 'epochz'; did you mean 'epochs'?"], result.stderr


def test_misspelt_field_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        apply_overrides(base_config(), ["optim.lrr=0.1"])


def test_every_field_has_a_rule_and_a_comment():
    import inspect

    from cifar_jax.config import RULES, flatten

    assert set(flatten(base_config())) == set(RULES)
    source = inspect.getsource(base_config)
    for name in RULES:
        line = next(l for l in source.splitlines() if f"c.{name} = " in l)
        above = source.splitlines()[source.splitlines().index(line) - 1]
        assert "#" in line or above.strip().startswith("#"), name


def test_help_lists_fields_and_print_config_resolves_overrides():
    result = run_module("cifar_jax.train", "--help", timeout=120)
    assert result.returncode == 0 and "optim.lr = 0.1" in result.stdout and "a finite number > 0" in result.stdout
    result = run_module("cifar_jax.train", "--config", "experiments/smoke.py", "--print-config", "--config.epochs=7", timeout=120)
    assert result.returncode == 0 and '"epochs": 7' in result.stdout and '"width": 4' in result.stdout
