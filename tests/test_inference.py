"""One predictor everywhere: training's evaluation, the report, explain and faithfulness agree."""

import ast
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from cifar_jax import cam, inference
from cifar_jax.augment import normalize
from cifar_jax.models import eval_logits
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def trained_and_data(smoke_workdir):
    trained = inference.load_trained(smoke_workdir)
    return trained, inference.load_run_data(trained)


def report_rows(workdir):
    """(test index, predicted class name) of the misclassified table in REPORT.md."""
    text = (Path(workdir) / "REPORT.md").read_text()
    return [(int(m[1]), m[2]) for m in re.finditer(r"^\| \d+ \| (\d+) \| \w+ \| (\w+) \|", text, re.M)]


def test_report_confusion_matrix_and_misclassified_grid_come_from_one_predictor(smoke_workdir, trained_and_data):
    trained, ds = trained_and_data
    assert trained.eval_flip  # the smoke config predicts with flip averaging
    preds = inference.predict(trained, ds.test_images, ds.test_labels)
    rows = report_rows(smoke_workdir)  # 20, or 5 once test_report has rebuilt it with --num 5
    expected = inference.misclassified_by_loss(preds)[: len(rows)]
    assert len(rows) >= 5 and [i for i, _ in rows] == list(expected)
    assert [name for _, name in rows] == [trained.class_names[c] for c in preds.predicted[expected]]
    text = (Path(smoke_workdir) / "REPORT.md").read_text()
    assert f"| accuracy | | | {preds.accuracy:.4f} |" in text  # the per-class table: the same predictions
    # Before the fix the grid ranked images by the un-flipped model: that ranking differs, so this test would fail there.
    plain = np.asarray(eval_logits(trained.model.apply, trained.variables, normalize(ds.test_images, trained.mean, trained.std)))
    plain_worst = inference.misclassified_by_loss(inference.Predictions(plain, ds.test_labels))
    assert list(plain_worst[:20]) != list(inference.misclassified_by_loss(preds)[:20])


def test_trained_predictor_equals_training_evaluation(smoke_workdir, trained_and_data):
    trained, ds = trained_and_data
    record = next(r for r in trained.history if r["step"] == trained.step)
    assert inference.predict(trained, ds.test_images, ds.test_labels).accuracy == pytest.approx(record["test_accuracy"], abs=1e-9)


def test_loaded_and_reinitialised_variables_share_compiled_programs(trained_and_data):
    """Loaded variables are placed like freshly made ones, so a program compiled for them is not compiled again."""
    trained, ds = trained_and_data
    x = normalize(ds.test_images[:4], trained.mean, trained.std)
    logits = jax.jit(lambda v, x: trained.network.apply(v, x, train=False))
    logits(trained.variables, x)
    logits(trained.network.init(jax.random.key(1), x, train=False), x)
    assert logits._cache_size() == 1


def test_explain_cli_honours_target_and_layer(smoke_workdir, trained_and_data, tmp_path, capsys):
    from cifar_jax import explain

    trained, ds = trained_and_data
    assert explain.main(["--workdir", str(smoke_workdir), "--num", "4", "--target", "cat", "--layer", "layer3",
                         "--out", str(tmp_path)]) == 0
    assert f"step {trained.step}" in capsys.readouterr().out  # says which checkpoint it used
    saved = np.load(tmp_path / "maps.npz")
    x = normalize(ds.test_images[saved["test_indices"]], trained.mean, trained.std)
    want = cam.compute_cams(trained.model, trained.variables, x, targets=3, layer="layer3").maps
    np.testing.assert_array_equal(saved["targets"], 3)
    np.testing.assert_allclose(saved["maps"], want, atol=1e-5)
    other = cam.compute_cams(trained.model, trained.variables, x, targets=3, layer="layer4").maps
    assert np.abs(np.asarray(other) - saved["maps"]).max() > 0.05  # layer4 would have given other maps


@pytest.mark.parametrize("spelling,canonical", [
    ("guided_grad_cam", "guided-gradcam"), ("guided-gradcam", "guided-gradcam"), ("Guided_Backprop", "guided-backprop"),
    ("grad_cam", "gradcam"), ("GradCAM++", "gradcam++"), ("score-cam", "scorecam"),
])
def test_method_names_accept_api_and_cli_spellings(spelling, canonical):
    assert inference.canonical_method(spelling) == canonical


def test_unknown_method_is_a_one_line_error():
    with pytest.raises(inference.ExplainError, match=r"unknown CAM method 'gradcan' \(did you mean gradcam"):
        inference.canonical_method("gradcan")


def test_summary_states_trainable_parameters(smoke_workdir, trained_and_data):
    trained, _ = trained_and_data
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trained.variables["params"]))
    assert f"Trainable parameters: {count:,};" in (Path(smoke_workdir) / "model_summary.txt").read_text()


CLI_MODULES = {"cifar_jax.train", "cifar_jax.explain", "cifar_jax.report"}


def imports_of(path: Path) -> set[str]:
    """cifar_jax modules a file imports, at module level or inside functions (``from pkg import sub``: pkg and pkg.sub)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cifar_jax"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cifar_jax"))
    return found


def test_no_import_cycle_and_no_library_imports_a_cli():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "cifar_jax").rglob("*.py")}
    graph = {m: {i for i in imports_of(p) if i in files and i != m} for m, p in files.items()}
    for module, deps in graph.items():
        if module not in CLI_MODULES:
            assert not deps & CLI_MODULES, f"{module} imports a CLI module: {deps & CLI_MODULES}"
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import cycle: {' -> '.join([*stack, m, d])}"
            if d not in state:
                visit(d, [*stack, m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])
