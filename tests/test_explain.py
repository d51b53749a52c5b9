import numpy as np
import pytest
from PIL import Image

from cifar_jax import explain


def run(capsys, *args):
    rc = explain.main(list(map(str, args)))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_default_explains_the_worst_misclassified_test_images(smoke_workdir, tmp_path, capsys):
    rc, out, err = run(capsys, "--workdir", smoke_workdir, "--num", 6, "--out", tmp_path)
    assert rc == 0, err
    assert (tmp_path / "misclassified_gradcam.png").stat().st_size > 10_000
    assert (tmp_path / "misclassified.png").exists()
    overlays = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 6
    width, height = Image.open(overlays[0]).size  # a labelled figure: image, map and colour bar, not a thumbnail
    assert width >= 600 and height >= 300
    assert "_true-" in overlays[0].name and "_pred-" in overlays[0].name and overlays[0].name.endswith("_gradcam.png")
    assert "Explained 6 misclassified test images with Grad-CAM at layer4" in out


def test_misclassified_are_sorted_by_loss(smoke_workdir):
    from cifar_jax import inference

    trained = inference.load_trained(smoke_workdir)
    ds = inference.load_run_data(trained)
    idx = inference.misclassified_by_loss(inference.predict(trained, ds.test_images, ds.test_labels))
    probs = np.asarray(__import__("jax").nn.softmax(trained.logits(ds.test_images[idx])))
    assert np.all(probs.argmax(-1) != ds.test_labels[idx])
    true_p = probs[np.arange(len(idx)), ds.test_labels[idx]]
    assert np.all(np.diff(true_p) >= -1e-6)  # highest loss = lowest true-class probability first


@pytest.mark.parametrize("method", ["gradcam++", "scorecam", "guided-gradcam"])
def test_other_methods_layers_and_targets(smoke_workdir, tmp_path, capsys, method):
    rc, _, err = run(capsys, "--workdir", smoke_workdir, "--num", 3, "--out", tmp_path, "--method", method,
                     "--layer", "layer3", "--target", "cat")
    assert rc == 0, err
    assert (tmp_path / f"misclassified_{method}.png").exists()


def write_user_images(d):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(d / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(d / "gray.png")
    Image.new("RGBA", (64, 48), (200, 10, 10, 128)).save(d / "rgba.png")
    Image.new("P", (32, 32), 3).save(d / "palette.gif")


def test_user_images_of_any_size_and_mode(smoke_workdir, tmp_path, capsys):
    write_user_images(tmp_path)
    names = ["photo.jpg", "gray.png", "rgba.png", "palette.gif"]
    out_dir = tmp_path / "out"
    rc, out, err = run(capsys, "--workdir", smoke_workdir, "--out", out_dir, "--images", *[tmp_path / n for n in names])
    assert rc == 0, err
    assert Image.open(out_dir / "photo_gradcam_overlay.png").size == (120, 90)  # the bare overlay: original resolution
    assert Image.open(out_dir / "rgba_gradcam_overlay.png").size == (64, 48)
    for name in names:  # the printed file: a labelled figure large enough to see, whatever the input's size
        figure = out_dir / f"{name.split('.')[0]}_gradcam.png"
        assert f"-> {figure}" in out and Image.open(figure).size[0] >= 600
    assert not list(out_dir.glob("*px.png"))
    model_line, *lines = out.strip().splitlines()
    assert model_line.startswith("Model: step ")
    assert len(lines) == 4
    for line in lines:  # top-3 classes with probabilities
        ranking = line.split(": ", 1)[1].split(" | ")[0].split(", ")
        probs = [float(item.rsplit(" ", 1)[1]) for item in ranking]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_bad_inputs_fail_one_line_each_and_valid_ones_still_run(smoke_workdir, tmp_path, capsys):
    write_user_images(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    good = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "folder").mkdir()
    out_dir = tmp_path / "out"
    bad = ["missing.png", "empty.png", "notes.jpg", "cut.jpg", "folder"]
    rc, out, err = run(capsys, "--workdir", smoke_workdir, "--out", out_dir,
                       "--images", tmp_path / "photo.jpg", *[tmp_path / b for b in bad], tmp_path / "gray.png")
    assert rc == 1
    errors = err.strip().splitlines()
    assert len(errors) == len(bad) + 1 and "Traceback" not in err
    for name, line in zip(bad, errors):
        assert line.startswith("error: ") and name in line
    assert "no such file" in errors[0] and "empty file" in errors[1] and "not an image" in errors[2]
    assert "cannot decode" in errors[3] and "is a directory" in errors[4]
    assert errors[-1] == f"error: {len(bad)} of {len(bad) + 2} images could not be explained"
    assert (out_dir / "photo_gradcam.png").exists() and (out_dir / "gray_gradcam.png").exists()


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--target", "unicorn"], 2, "unknown class 'unicorn'"),
        (["--layer", "layer9"], 2, "unknown layer 'layer9'"),
        (["--step", "12345"], 1, "no checkpoint at step 12345"),
    ],
)
def test_bad_arguments_are_one_line_errors(smoke_workdir, tmp_path, capsys, args, code, message):
    rc, _, err = run(capsys, "--workdir", smoke_workdir, "--out", tmp_path, *args)
    assert rc == code
    assert err.strip().count("\n") == 0 and message in err


def test_workdir_without_checkpoints(tmp_path, capsys):
    rc, _, err = run(capsys, "--workdir", tmp_path)
    assert rc == 1 and "has no checkpoints" in err and err.strip().count("\n") == 0


def test_missing_workdir_says_it_does_not_exist(tmp_path, capsys):
    rc, _, err = run(capsys, "--workdir", tmp_path / "typo")
    assert rc == 1 and "does not exist" in err and "checkpoints" not in err and err.strip().count("\n") == 0


def test_evaluate_writes_a_faithfulness_table(smoke_workdir, tmp_path, capsys):
    rc, out, err = run(capsys, "--workdir", smoke_workdir, "--out", tmp_path, "--evaluate", "--eval-images", 8,
                       "--methods", "gradcam", "layercam")
    assert rc == 0, err
    table = (tmp_path / "faithfulness.md").read_text()
    for name in ("| gradcam |", "| layercam |", "| random |", "| gaussian |", "deletion_auc", "road_morf", "sanity_spearman"):
        assert name in table, name
    assert "cascading randomisation" in out and "head+layer4" in table
    record = __import__("json").loads((tmp_path / "faithfulness.json").read_text())
    assert record["num_images"] == 8 and len(record["rows"]) == 4 and record["cascade"][0]["spearman"] > 0.99
    gradcam = next(row for row in record["rows"] if row["method"] == "gradcam")
    assert gradcam["sanity_spearman"] == record["cascade"][-1]["spearman"]  # one figure: table column = cascade's last row
    assert -1.0 <= record["different_images_spearman"] <= 1.0 and "maps of different images" in table


def test_list_layers_and_any_module_path(smoke_workdir, tmp_path, capsys):
    rc, out, err = run(capsys, "--workdir", smoke_workdir, "--list-layers")
    assert rc == 0, err
    assert "layer3/block0/conv2" in out and "(1, 8, 8, 16)" in out  # width 4: layer3 has 16 channels at 8x8
    rc, out, err = run(capsys, "--workdir", smoke_workdir, "--num", 2, "--out", tmp_path, "--layer", "layer3/block0/conv2")
    assert rc == 0, err
    assert "at layer3/block0/conv2" in out and np.load(tmp_path / "maps.npz")["maps"].shape == (2, 32, 32)
    rc, _, err = run(capsys, "--workdir", smoke_workdir, "--layer", "layer3/block0/conv9")
    assert rc == 2 and "close matches: layer3/block0/conv2" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("method", ["integrated_gradients", "Ablation-CAM", "fullgrad"])
def test_methods_beyond_the_original_family(smoke_workdir, tmp_path, capsys, method):
    rc, out, err = run(capsys, "--workdir", smoke_workdir, "--num", 2, "--out", tmp_path, "--method", method)
    assert rc == 0, err
    maps = np.load(tmp_path / "maps.npz")["maps"]
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1 and maps.std() > 0


def test_help_is_plain_text_with_durations(capsys):
    with pytest.raises(SystemExit) as done:
        explain.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0 and "``" not in out and "python -m cifar_jax.explain --workdir DIR" in out
    assert "minutes on 2 CPU cores" in out and "docs/faithfulness.md" in out  # where --evaluate's measured durations are
