"""MLflow: experiment set-up, the logged model format, registration and plots."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from dlpipe.config import MlflowConfig

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# the pyfunc output follows from the model's task
OUTPUT_SCHEMAS = {
    "classification": Schema([
        ColSpec(DataType.long, "prediction"),
        ColSpec(DataType.string, "label_name"),
        ColSpec(Array(DataType.float), "probabilities"),
    ]),
    "regression": Schema([ColSpec(DataType.double, "prediction")]),
}


def input_schema(column: str) -> Schema:
    return Schema([ColSpec(Array(DataType.double), column)])  # plain Python floats; cast to float32 inside


def setup(cfg: MlflowConfig) -> str:
    """Point MLflow at the configured store; returns the experiment id."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = MlflowClient()
    try:
        experiment = client.get_experiment_by_name(cfg.experiment)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        from dlpipe.errors import TrackingUnreachable

        raise TrackingUnreachable(f"MLflow tracking store {cfg.tracking_uri} is unreachable: {type(exc).__name__}: {first_line}") from None
    if experiment is None and cfg.tracking_uri.startswith(("http://", "https://")):
        experiment_id = client.create_experiment(cfg.experiment)  # the server's artifact store (--serve-artifacts)
    elif experiment is None:
        location = cfg.artifact_root if "://" in cfg.artifact_root else Path(cfg.artifact_root).as_uri()
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=f"{location}/{cfg.experiment}")
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def log_model(model: torch.nn.Module, net, input_column: str, classes: list[str], example: np.ndarray, config: dict):
    """Log the trained net as a pyfunc model (exported program + this model's code) with a
    signature and an input example; also keeps the state dict, the net description (model name,
    hyperparameters, input shape, task: enough to rebuild it with dl.models) and the resolved config."""
    model = model.eval()
    input_shape = tuple(net.input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    program = torch.export.export(model, (torch.zeros(2, *input_shape),), dynamic_shapes={"x": {0: batch}})
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "program": Path(tmp, "model.pt2"),
            "meta": Path(tmp, "meta.json"),
            "state_dict": Path(tmp, "state_dict.pt"),
            "config": Path(tmp, "config.json"),
        }
        torch.export.save(program, paths["program"])
        paths["meta"].write_text(json.dumps({"input_shape": list(input_shape), "classes": classes, "task": net.task,
                                             "input_column": input_column, "net": net.to_dict(),
                                             "input_range": [0.0, 1.0] if input_column == "pixels" else None}))
        torch.save(model.state_dict(), paths["state_dict"])
        paths["config"].write_text(json.dumps(config, indent=2))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={k: str(v) for k, v in paths.items()},
            signature=ModelSignature(inputs=input_schema(input_column), outputs=OUTPUT_SCHEMAS[net.task]),
            input_example=pd.DataFrame({input_column: [row.tolist() for row in example.reshape(len(example), -1)]}),
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"],
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def curves_figure(history: list[dict]):
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    metric = "accuracy" if "accuracy" in history[0] else "mae"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss" if metric == "accuracy" else "mean squared error", title="Loss")
    ax_acc.plot(epochs, [h[metric] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", label="val")
    ax_acc.set(xlabel="epoch", ylabel=metric, title="Accuracy" if metric == "accuracy" else "Mean absolute error")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    shown = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.colorbar(shown, ax=ax)
    fig.tight_layout()
    return fig


def load_net(model_uri: str):
    """(torch module in eval mode, meta) of a logged model, rebuilt with dl.models from the state
    dict and net description stored with it: for heatmaps, embeddings and fine-tuning."""
    local = mlflow.artifacts.download_artifacts(model_uri)
    return net_from_dir(local)


def net_from_dir(local: str):
    from dl.models import REGISTRY, Net, build
    from dlpipe.typed import build as build_config

    artifacts = Path(local, "artifacts")
    meta = json.loads((artifacts / "meta.json").read_text())
    if "net" not in meta:
        raise ValueError(f"{local}: logged before models carried their net description; retrain it")
    d = meta["net"]
    net = Net(name=d["name"], params=build_config(REGISTRY[d["name"]].config, d["params"], f"model.{d['name']}."),
              input_shape=tuple(d["input_shape"]), num_outputs=d["num_outputs"], task=d["task"])
    module = build(net)
    module.load_state_dict(torch.load(artifacts / "state_dict.pt", map_location="cpu"))
    return module.eval(), meta | {"net_obj": net}
