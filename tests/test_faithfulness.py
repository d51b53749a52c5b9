"""Explanation-quality metrics: known answers on a toy model, and the sanity check on a tiny ResNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats

from cifar_jax import faithfulness as F
from cifar_jax import faithfulness_table as T
from cifar_jax import sanity as S
from cifar_jax.models import ResNet

N, SIDE = 8, 16
PATCH = (slice(4, 8), slice(8, 12))  # the only pixels the toy model looks at (off-centre on purpose)


def key(seed):
    """RBG keys: the metrics work with any key type, and RBG compiles much faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


def toy_logits(images):
    """Two classes; the class-1 logit is an affine function of the mean of one 4x4 patch, the rest is ignored."""
    s = images[:, PATCH[0], PATCH[1], :].mean(axis=(1, 2, 3))
    return jnp.stack([jnp.zeros_like(s), 8.0 * (s - 0.75)], axis=-1)


@pytest.fixture(scope="module")
def toy():
    """Noise images whose patch is brighter (class 1 at ~0.998), the right map and the two baselines."""
    images = jax.random.normal(key(0), (N, SIDE, SIDE, 3)).at[:, PATCH[0], PATCH[1], :].add(1.5)
    targets = jnp.ones((N,), jnp.int32)
    right = jnp.zeros((N, SIDE, SIDE)).at[:, PATCH[0], PATCH[1]].set(1.0)
    return images, targets, {
        "right": right,
        "random": F.random_saliency(key(1), (N, SIDE, SIDE)),
        "gaussian": F.gaussian_saliency((N, SIDE, SIDE)),
    }


@pytest.fixture(scope="module")
def toy_metrics(toy):
    """Mean of every metric for each map, with the same key (common random numbers)."""
    images, targets, maps = toy
    out = {}
    for name, saliency in maps.items():
        m = F.image_metrics(toy_logits, images, saliency, targets, key(2), steps=16)
        out[name] = {k: float(v.mean()) for k, v in m.items()}
    return out


# (metric, True if lower is better, margin the right map must win by)
TOY_EXPECTATIONS = [
    ("deletion_auc", True, 0.2),
    ("insertion_auc", False, 0.2),
    ("road_morf", True, 0.3),
    ("road_lerf", False, 0.05),
    ("average_drop", True, 10.0),
]


@pytest.mark.parametrize("metric, lower_is_better, margin", TOY_EXPECTATIONS)
def test_right_map_beats_random_baseline(toy_metrics, metric, lower_is_better, margin):
    right, random = toy_metrics["right"][metric], toy_metrics["random"][metric]
    gain = random - right if lower_is_better else right - random
    assert gain > margin, f"{metric}: right map {right:.3f} vs random {random:.3f}"


def test_right_map_has_near_ideal_scores(toy_metrics):
    """The patch is 1/16 of the image: deleting it first kills the class after one step of 16."""
    m = toy_metrics["right"]
    assert m["deletion_auc"] < 0.1 and m["insertion_auc"] > 0.9
    assert m["road_morf"] < 0.05 and m["road_lerf"] > 0.99
    assert m["average_drop"] == pytest.approx(0.0, abs=1e-4)


def test_curve_endpoints_are_the_original_and_the_baseline(toy):
    images, targets, maps = toy
    p = lambda x: np.asarray(F.target_probability(toy_logits, x, targets))
    deletion = np.asarray(F.deletion_curve(toy_logits, images, maps["random"], targets, steps=8, blur_sigma=2.0))
    to_mean = np.asarray(F.deletion_curve(toy_logits, images, maps["random"], targets, steps=8, baseline=0.0))
    insertion = np.asarray(F.insertion_curve(toy_logits, images, maps["random"], targets, steps=8, blur_sigma=2.0))
    assert deletion.shape == insertion.shape == (N, 9)
    np.testing.assert_allclose(deletion[:, 0], p(images), atol=1e-6)
    np.testing.assert_allclose(deletion[:, -1], p(F.gaussian_blur(images, 2.0)), atol=1e-6)
    np.testing.assert_allclose(to_mean[:, -1], p(jnp.zeros_like(images)), atol=1e-6)
    np.testing.assert_allclose(insertion[:, 0], p(F.gaussian_blur(images, 2.0)), atol=1e-6)
    np.testing.assert_allclose(insertion[:, -1], p(images), atol=1e-6)


def test_auc_is_the_trapezoid_rule():
    curves = jnp.array([[1.0, 0.5, 0.0], [0.2, 0.2, 0.2], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(F.auc(curves), [0.5, 0.2, 0.5], atol=1e-7)
    rng = np.random.default_rng(0).random((3, 11))
    np.testing.assert_allclose(F.auc(jnp.asarray(rng)), np.trapezoid(rng, dx=0.1, axis=1), rtol=1e-5)


def test_pixel_ranks_order_and_tie_breaking():
    saliency = jnp.array([[[0.9, 0.1], [0.5, 0.5]]] * 2)  # one (2, 2) map twice, with a tie
    ranks = np.asarray(F.pixel_ranks(saliency))
    assert ranks[0].tolist() == [[0, 3], [1, 2]]  # raster order breaks the tie without a key
    assert np.asarray(F.pixel_ranks(saliency, descending=False))[0].tolist() == [[3, 0], [1, 2]]
    tied = jnp.zeros((1, 8, 8))
    a = np.asarray(F.pixel_ranks(tied, key(0)))
    b = np.asarray(F.pixel_ranks(tied, key(1)))
    assert sorted(a.ravel()) == list(range(64)) and not np.array_equal(a, b)


def _reference_imputation(image, removed):
    """ROAD's sparse system, built pixel by pixel and solved with scipy: (H, W, C), (H, W) -> (H, W, C)."""
    h, w, c = image.shape
    unknown = {p: i for i, p in enumerate(zip(*np.nonzero(removed)))}
    a = scipy.sparse.lil_matrix((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), c))
    for (y, x), i in unknown.items():
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy or dx) and 0 <= yy < h and 0 <= xx < w:
                    weight = 1 / 6 if dy == 0 or dx == 0 else 1 / 12
                    a[i, i] += weight
                    if (yy, xx) in unknown:
                        a[i, unknown[yy, xx]] -= weight
                    else:
                        b[i] += weight * image[yy, xx]
    solution = scipy.sparse.linalg.spsolve(a.tocsc(), b).reshape(-1, c)
    out = image.copy()
    for (y, x), i in unknown.items():
        out[y, x] = solution[i]
    return out


def test_noisy_linear_imputation_matches_a_sparse_direct_solve():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
    removed = rng.random((2, 12, 12)) < 0.7
    removed[1, :6] = True  # a large block touching the border as well as scattered pixels
    filled = np.asarray(F.noisy_linear_impute(images, removed, key(0), noise=0.0))
    for i in range(2):
        np.testing.assert_allclose(filled[i], _reference_imputation(images[i], removed[i]), atol=2e-4)
    noisy = np.asarray(F.noisy_linear_impute(images, removed, key(0), noise=0.1))
    np.testing.assert_array_equal(noisy[~removed], images[~removed])  # kept pixels are untouched
    assert 0.05 < np.std(noisy[removed] - filled[removed]) < 0.2


def test_average_drop_known_values(toy):
    images, targets, _ = toy
    mean, std = jnp.array([0.5, 0.4, 0.3]), jnp.array([0.2, 0.25, 0.3])
    ones = jnp.ones((N, SIDE, SIDE))
    drop, increase = F.average_drop_increase(toy_logits, images, ones, targets, mean=mean, std=std)
    np.testing.assert_allclose(drop, 0.0, atol=1e-3)  # a map of ones returns the image (unnormalise, renormalise)
    assert float(increase.sum()) == 0.0
    y = np.asarray(F.target_probability(toy_logits, images, targets))
    o = np.asarray(F.target_probability(toy_logits, 0.5 * images, targets))
    drop, increase = F.average_drop_increase(toy_logits, images, 0.5 * ones, targets)
    np.testing.assert_allclose(drop, 100 * np.maximum(0, y - o) / y, rtol=1e-5)
    np.testing.assert_array_equal(increase, 100.0 * (o > y))


def test_baseline_maps():
    g = np.asarray(F.gaussian_saliency((2, 33, 33)))
    assert g.shape == (2, 33, 33) and g[0, 16, 16] == pytest.approx(1.0)
    assert g[0, 16, 16 + 8] == pytest.approx(np.exp(-(8**2) / (2 * (33 / 4) ** 2)), rel=1e-5)  # sigma = side / 4
    np.testing.assert_allclose(g[0], g[0].T)
    r1 = np.asarray(F.random_saliency(key(0), (2, 8, 8)))
    r2 = np.asarray(F.random_saliency(key(1), (2, 8, 8)))
    assert r1.min() >= 0 and r1.max() < 1 and not np.allclose(r1, r2)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (3, 5, 5)).astype(np.float32)  # many ties
    b = a + rng.normal(size=a.shape).astype(np.float32)
    expected = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    np.testing.assert_allclose(S.spearman(a, b), expected, atol=1e-5)
    assert np.isnan(S.spearman(np.ones((1, 4, 4)), b[:1, :4, :4])[0])


# --------------------------------------------------------------------------- tiny ResNet


@pytest.fixture(scope="module")
def tiny_resnet():
    """A width-4 ResNet with one block per stage (same stage names as ResNet18), at random init.

    He's init: with PyTorch's smaller weights this untrained net's Grad-CAM maps are all zero (after the ReLU) for
    some images, whose rank correlation is then undefined (NaN, as the sanity check reports it)."""
    model = ResNet(stage_sizes=(1, 1, 1, 1), width=4, num_classes=10, weight_init="he")
    variables = S.fresh_variables(model, key(0))
    images = jax.random.normal(key(1), (8, 32, 32, 3))
    return model, variables, images, jnp.arange(8) % 10


def test_randomize_params_replaces_only_the_named_groups(tiny_resnet):
    model, variables, _, _ = tiny_resnet
    trained = jax.tree.map(lambda x: x + 0.5, variables)  # stands in for trained weights (BN init is deterministic)
    new = S.randomize_params(model, trained, ("head", "stem"), key(7))
    fresh = S.fresh_variables(model, key(7))
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))
    for col, name in (("params", "head"), ("params", "stem_conv"), ("params", "stem_bn"), ("batch_stats", "stem_bn")):
        assert same(new[col][name], fresh[col][name]) and not same(new[col][name], trained[col][name]), (col, name)
    for col, name in (("params", "layer1"), ("params", "layer4"), ("batch_stats", "layer2")):
        assert same(new[col][name], trained[col][name]), (col, name)
    assert jax.tree.structure(new) == jax.tree.structure(variables)


def test_cascading_randomization_destroys_rank_correlation(tiny_resnet):
    model, variables, images, targets = tiny_resnet
    rows = S.cascading_randomization(model, variables, images, targets, key(5))
    assert [r["randomized"] for r in rows][:3] == ["none", "head", "head+layer4"] and len(rows) == 7
    assert rows[0]["spearman"] == pytest.approx(1.0)
    assert rows[-1]["spearman"] < 0.5, rows


def test_evaluate_methods_table(tiny_resnet):
    model, variables, images, _ = tiny_resnet
    rows = T.evaluate_methods(  # same image batch as above, so the compiled Grad-CAM is reused
        model, variables, images, None, methods=("gradcam",), key=key(0),
        steps=4, percentages=(0.3, 0.6), road_iters=20, batch_size=8, sanity_images=8, step_batch=5,
    )
    assert [r["method"] for r in rows] == ["gradcam", "random", "gaussian"]  # targets None: the predicted classes
    for row in rows:
        for column in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf", "average_drop", "increase_confidence"):
            assert np.isfinite(row[column]), (row["method"], column)
        assert len(row["road_morf_curve"]) == 2
    assert rows[1]["sanity_spearman"] == 1.0 and rows[0]["sanity_spearman"] < 1.0
    table = T.format_table(rows).splitlines()
    assert len(table) == 5 and "deletion_auc ↓" in table[0] and table[2].startswith("| gradcam | 8 |")


def test_maps_equal_to_an_earlier_methods_are_scored_once(tiny_resnet, monkeypatch):
    model, variables, images, targets = tiny_resnet
    scored = []
    real = T.image_metrics
    monkeypatch.setattr(T, "image_metrics", lambda *a, **k: scored.append(1) or real(*a, **k))
    rows = T.evaluate_methods(  # At the last layer HiResCAM is Grad-CAM (a linear head after global pooling); LayerCAM is not.
        model, variables, images, targets, methods=("gradcam", "hirescam", "layercam"), key=key(0),
        steps=4, percentages=(0.3, 0.6), road_iters=20, batch_size=8, sanity_images=0, step_batch=5,
    )
    assert len(scored) == 4  # gradcam, layercam, random, gaussian
    gradcam, hirescam, layercam = rows[:3]
    scores = lambda row: {k: v for k, v in row.items() if k not in ("method", "sanity_spearman")}  # sanity: NaN, skipped
    assert scores(hirescam) == scores(gradcam)
    assert layercam["average_drop"] != gradcam["average_drop"]
    assert T._same_maps(jnp.zeros((2, 4, 4)), jnp.full((2, 4, 4), 1e-6)) and not T._same_maps(jnp.zeros((2, 4, 4)), jnp.full((2, 4, 4), 1e-3))


def test_sanity_figure_is_the_cascades_last_row(tiny_resnet):
    model, variables, images, targets = tiny_resnet
    rows = S.cascading_randomization(model, variables, images, targets, key(3), draws=3)
    figure = S.full_randomization_spearman(model, variables, images, targets, key(3), draws=3)
    assert figure == rows[-1]["spearman"] == pytest.approx(np.mean(rows[-1]["spearman_draws"]))
    assert len(rows[-1]["spearman_draws"]) == 3 and len(set(rows[-1]["spearman_draws"])) == 3  # three different weights
    assert S.full_randomization_spearman(model, variables, images, targets, key(4), draws=3) != figure


def test_table_sanity_column_is_the_cascades_last_row(tiny_resnet):
    model, variables, images, targets = tiny_resnet
    rows = T.evaluate_methods(
        model, variables, images, targets, methods=("gradcam", "layercam"), key=key(0), cascade=("gradcam",),
        steps=4, percentages=(0.3, 0.6), road_iters=20, batch_size=8, sanity_images=8, sanity_draws=2, step_batch=5,
    )
    gradcam, layercam = rows[0], rows[1]
    assert gradcam["sanity_spearman"] == gradcam["sanity_cascade"][-1]["spearman"] and "sanity_cascade" not in layercam
    k_sanity = jax.random.split(key(0), 3)[2]
    assert gradcam["sanity_spearman"] == S.full_randomization_spearman(model, variables, images, targets, k_sanity, draws=2)


def test_randomisation_check_falls_on_a_trained_model(smoke_workdir):
    """On a trained model the maps must decorrelate once the weights are random, at every draw."""
    from cifar_jax.inference import load_test_images, load_trained

    trained = load_trained(smoke_workdir)
    images, labels = load_test_images(trained, 32)
    rows = S.cascading_randomization(trained.model, trained.variables, images, labels, key(0), draws=4)
    assert rows[0]["spearman"] == 1.0
    last = rows[-1]
    assert last["spearman"] < 0.4 and max(last["spearman_draws"]) < 0.6, rows
    assert max(r["spearman"] for r in rows[1:]) < 0.6, rows  # no step of the cascade stays near the trained maps


def test_deletion_fill_blur_by_default_mean_on_request(toy):
    images, targets, maps = toy
    k_rank = jax.random.split(key(2))[0]  # image_metrics' tie-breaking key
    kw = dict(steps=8, percentages=(0.5,), road_iters=5)
    blur = F.image_metrics(toy_logits, images, maps["random"], targets, key(2), blur_sigma=2.0, **kw)["deletion_auc"]
    mean = F.image_metrics(toy_logits, images, maps["random"], targets, key(2), deletion_fill="mean", **kw)["deletion_auc"]
    curve = lambda **b: F.auc(F.deletion_curve(toy_logits, images, maps["random"], targets, steps=8, key=k_rank, **b))
    np.testing.assert_allclose(blur, curve(blur_sigma=2.0), atol=1e-6)
    np.testing.assert_allclose(mean, curve(baseline=0.0), atol=1e-6)
    assert not np.allclose(blur, mean)
    with pytest.raises(ValueError, match="deletion_fill"):
        F.image_metrics(toy_logits, images, maps["random"], targets, key(2), deletion_fill="zero", **kw)


def test_different_images_spearman_measures_the_shared_pattern():
    one = jax.random.uniform(key(0), (1, 8, 8))
    assert S.different_images_spearman(jnp.repeat(one, 4, axis=0)) == pytest.approx(1.0)
    independent = jax.random.uniform(key(1), (64, 8, 8))
    assert abs(S.different_images_spearman(independent)) < 0.05
    shared = 0.5 * independent + jnp.repeat(one, 64, axis=0)  # one pattern plus image-specific noise
    assert 0.5 < S.different_images_spearman(shared) < 1.0
