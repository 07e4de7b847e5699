"""`dlpipe explain`: the occlusion heatmap of one image (dlpipe.occlusion), as a PNG. No Spark."""

from __future__ import annotations

from dlpipe import tracking
from dlpipe.config import MlflowConfig
from dlpipe.occlusion import figure, load_image, occlusion, torch_proba


def run(mlflow_cfg: MlflowConfig, *, model_uri: str, image_uri: str, out: str = "heatmap.png") -> dict:
    """The heatmap of `image_uri` for `model_uri` overlaid on the image, written to `out`."""
    tracking.setup(mlflow_cfg)
    module, meta = tracking.load_net(model_uri)
    if meta.get("task") != "classification" or meta.get("input_column") != "pixels":
        raise ValueError(f"{model_uri} is not an image classifier: occlusion heatmaps need one")
    image = load_image(image_uri, tuple(meta["input_shape"]))
    heat, target, p = occlusion(torch_proba(module), image)
    name = meta["classes"][target]
    figure([image], [heat], [f"{name} p={p:.2f}"], columns=1).savefig(out, dpi=150)
    return {"step": "explain", "model_uri": model_uri, "image": image_uri, "predicted": name, "probability": p,
            "heatmap": str(out), "max_drop": float(heat.max())}
