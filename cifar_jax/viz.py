"""Pictures: heat-map overlays (pure numpy) and matplotlib grids written to PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cifar_jax.files import atomic_path


def heatmap_overlay(image, cam, alpha: float = 0.5, colormap: str = "jet"):
    """Blends a colour-mapped CAM over an image.

    Args:
      image: (H, W, 3) float in [0, 1] or uint8.
      cam: (H, W) float in [0, 1], same H, W as the image.
      alpha: weight of the heat map (0 = image only).

    Returns:
      (H, W, 3) float32 in [0, 1], like pytorch-grad-cam's ``show_cam_on_image``.
    """
    from matplotlib import colormaps

    image = np.asarray(image)
    image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else np.array(image, np.float32)  # a copy
    cam = np.clip(np.asarray(cam, np.float32), 0.0, 1.0)
    if cam.shape != image.shape[:2]:
        raise ValueError(f"cam of shape {cam.shape} does not match image of shape {image.shape[:2]}")
    # The colour map as uint8 (bytes=True): a quarter of the memory of its float64 RGBA; float32 from here on.
    heat = colormaps[colormap](cam, bytes=True)[..., :3].astype(np.float32) / 255.0
    image *= 1 - alpha
    image += alpha * heat
    return np.clip(image, 0.0, 1.0, out=image)


def save_png(path, image) -> None:
    """Writes an (H, W, 3) float [0, 1] or uint8 array as a PNG."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, optimize=True)


def bare(ax) -> None:
    """Draws a matplotlib axes as a bare picture: no frame, no ticks (not merely hidden: matplotlib lays out hidden
    ticks too, which took half the time of a grid of 20 images)."""
    ax.axis("off")
    ax.set(xticks=[], yticks=[])


def image_grid(
    path, images, titles: Sequence[str], overlays=None, cols: int = 5, title: str | None = None, overlay_label: str = "Grad-CAM",
    colorbar: bool = False, colormap: str = "jet",
) -> None:
    """A grid of images with a caption each; with ``overlays``, each image's heat map sits right beside it.

    Args:
      images: (N, H, W, 3) uint8 or [0, 1] float.
      titles: N captions (e.g. "true: cat\\npred: dog 0.81").
      overlays: optional (N, H, W, 3) overlays drawn next to their images.
      colorbar: add the heat map's colour scale at the right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    per_item = 2 if overlays is not None else 1
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols * per_item, figsize=(1.6 * cols * per_item, 2.25 * rows), squeeze=False)
    for ax in axes.flat:
        bare(ax)
    for i in range(n):
        r, c = divmod(i, cols)
        ax = axes[r, c * per_item]
        ax.imshow(images[i], interpolation="nearest")
        ax.set_title(titles[i], fontsize=8)
        if overlays is not None:
            axes[r, c * per_item + 1].imshow(overlays[i], interpolation="bilinear")
            axes[r, c * per_item + 1].set_title(overlay_label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if colorbar:
        from matplotlib import cm, colors

        fig.subplots_adjust(right=0.93)
        scale = fig.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), colormap), cax=fig.add_axes([0.945, 0.2, 0.012, 0.6]))
        scale.set_label("relevance", fontsize=8)
    save_figure(fig, path, dpi=90)


def explanation_figure(path, image, picture, title: str, picture_title: str, colorbar: bool = True,
                       colormap: str = "jet") -> None:
    """One labelled PNG (~800x400 px): ``image`` beside its explanation ``picture``, with a colour bar for heat maps.

    Args:
      image: (H, W, 3) the image as explained (any size; small ones are drawn with crisp pixels).
      picture: (h, w, 3) the heat-map overlay or the guided gradients, float in [0, 1] or uint8.
      title: above both (e.g. the file, the predicted class and its probability).
      picture_title: above the picture (e.g. the method, the layer and the class explained).
      colorbar: draw the colour map's scale (for heat maps, not for guided gradients).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4), gridspec_kw={"wspace": 0.08})
    for ax, img, name in ((left, image, "image"), (right, picture, picture_title)):
        img = np.asarray(img)
        ax.imshow(img, interpolation="nearest" if max(img.shape[:2]) < 128 else "antialiased")
        ax.set_title(name, fontsize=9)
        bare(ax)
    if colorbar:
        scale = fig.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), colormap), ax=[left, right], fraction=0.03, pad=0.02)
        scale.set_label("relevance (0 = none, 1 = the map's maximum)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=100)


def save_figure(fig, path, dpi: int, palette: bool = True) -> None:
    """Writes a matplotlib figure as a PNG atomically (a failed or interrupted write leaves the old picture) and
    closes it; ``palette`` re-saves it with 256 colours (``shrink_png``), for grids of photos."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
            if palette:
                shrink_png(tmp)
    finally:
        plt.close(fig)


def shrink_png(path) -> None:
    """Re-saves a PNG with a 256-colour palette: grids of photos shrink about 3x, still readable."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def explanation_pictures(images, explanation, alpha: float = 0.5) -> np.ndarray:
    """What to draw for an ``inference.Explanation`` of (N, H, W, 3) images -> (N, H, W, 3) float in [0, 1].

    Heat-map overlays for CAMs; for the guided methods the input gradients themselves
    (standardised around grey, as pytorch-grad-cam's ``deprocess_image``).
    """
    from cifar_jax.cam import deprocess_gradients

    if explanation.guided is not None:
        return np.asarray(deprocess_gradients(explanation.guided))
    return np.stack([heatmap_overlay(img, m, alpha) for img, m in zip(images, explanation.maps)])
