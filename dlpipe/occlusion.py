"""Classification heatmaps by occlusion (course notes 001; Zeiler & Fergus 2013): slide a grey
patch over the image and record how much the predicted class probability drops. Where it drops
most is what the model looked at. `occlusion` is plain numpy around any probability function."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch


def occlusion(predict_proba: Callable[[np.ndarray], np.ndarray], image: np.ndarray, target: int | None = None,
              patch: int = 0, stride: int = 0, fill: float = 0.5, batch: int = 256) -> tuple[np.ndarray, int, float]:
    """(heatmap H x W, target class, its probability on the whole image) for `image` (C x H x W in
    [0, 1]). heatmap[y, x] = mean drop of p(target) over the patches that covered pixel (y, x).
    patch defaults to a quarter of the image side (at least 3 px), stride to half the patch."""
    _, h, w = image.shape
    patch = patch or max(3, min(h, w) // 4)
    stride = stride or max(1, patch // 2)
    base = predict_proba(image[None].astype(np.float32))[0]
    target = int(base.argmax()) if target is None else target
    corners = [(y, x) for y in range(0, max(h - patch, 0) + 1, stride) for x in range(0, max(w - patch, 0) + 1, stride)]
    drops = np.zeros((h, w), np.float64)
    counts = np.zeros((h, w), np.float64)
    for start in range(0, len(corners), batch):
        chunk = corners[start : start + batch]
        occluded = np.repeat(image[None].astype(np.float32), len(chunk), axis=0)
        for i, (y, x) in enumerate(chunk):
            occluded[i, :, y : y + patch, x : x + patch] = fill
        p = predict_proba(occluded)[:, target]
        for (y, x), pi in zip(chunk, p):
            drops[y : y + patch, x : x + patch] += base[target] - pi
            counts[y : y + patch, x : x + patch] += 1
    return drops / np.maximum(counts, 1), target, float(base[target])


def torch_proba(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    module = module.eval()

    @torch.no_grad()
    def proba(x: np.ndarray) -> np.ndarray:
        return torch.softmax(module(torch.from_numpy(np.ascontiguousarray(x, np.float32))), dim=1).numpy()

    return proba


def overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    shown = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
    ax.imshow(heat, cmap="jet", alpha=0.5, vmin=min(0.0, float(heat.min())), vmax=max(float(heat.max()), 1e-6))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def figure(images: list[np.ndarray], heats: list[np.ndarray], titles: list[str], columns: int = 4):
    from dlpipe.tracking import _pyplot

    plt = _pyplot()
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, heat, title in zip(axes.ravel(), images, heats, titles):
        overlay(ax, image, heat, title)
    fig.suptitle("Occlusion: drop in p(predicted class) when a grey patch covers the region", fontsize=9)
    fig.tight_layout()
    return fig


def load_image(uri: str, shape: tuple[int, int, int]) -> np.ndarray:
    """An image file (local path or any URI the storage layer reads) as C x H x W floats in [0, 1],
    decoded the way `prepare` decodes the landing zone."""
    from PIL import Image

    from dlpipe.storage import filesystem

    if uri.startswith("file:") and not uri.startswith("file://"):  # Spark's file:/path form (the `source` column)
        uri = uri[len("file:"):]
    filesys, path = filesystem(uri)
    try:
        with filesys.open_input_stream(path) as f:
            content = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {uri} does not exist") from None
    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(content)) as image:
            array = np.asarray(image.convert({1: "L", 3: "RGB"}[channels]).resize((width, height)), np.float32) / 255.0
    except Exception as exc:
        raise ValueError(f"image {uri} cannot be decoded: {type(exc).__name__}: {exc}") from None
    return array.reshape(height, width, channels).transpose(2, 0, 1)


def sample_grid(test_df, model_uri: str, classes: list[str], n: int = 8):
    """The evaluate step's grid: heatmaps of the first `n` test images (by key)."""
    from dlpipe.tracking import load_net

    module, meta = load_net(model_uri)
    shape = tuple(meta["input_shape"])
    rows = test_df.select("key", "label", "pixels").orderBy("key").limit(n).collect()
    images = [np.asarray(r["pixels"], np.float32).reshape(shape) for r in rows]
    proba = torch_proba(module)
    heats, titles = [], []
    for r, image in zip(rows, images):
        heat, target, p = occlusion(proba, image)
        heats.append(heat)
        titles.append(f"true {classes[r['label']]}\npred {classes[target]} p={p:.2f}")
    return figure(images, heats, titles)
