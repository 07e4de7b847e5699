"""MLflow: experiment set-up, the logged model format, registration and plots."""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from dlpipe.config import MlflowConfig

# torch.export and torch.jit.script are not thread-safe, and a module built in another thread while one
# exports can end up in the exported program: tune's trials build and log models from driver threads
TORCH_LOCK = threading.RLock()
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
BRACKETED_CODE = Path(__file__).parents[1] / "dl" / "bracketed.py"  # an RNTN's tree parser, shipped as code
SEQUENCE_PYFUNC_CODE = Path(__file__).with_name("pyfunc_sequence.py")  # recurrent models: raw text or a window in
# the pyfunc output follows from the model's task
OUTPUT_SCHEMAS = {
    "classification": Schema([
        ColSpec(DataType.long, "prediction"),
        ColSpec(DataType.string, "label_name"),
        ColSpec(Array(DataType.float), "probabilities"),
    ]),
    "regression": Schema([ColSpec(DataType.double, "prediction")]),
    "reconstruction": Schema([ColSpec(Array(DataType.float), "code"), ColSpec(DataType.double, "reconstruction_error")]),
    "clustering": Schema([ColSpec(DataType.long, "bmu"), ColSpec(DataType.long, "bmu_row"), ColSpec(DataType.long, "bmu_col"),
                          ColSpec(DataType.double, "quantization_error")]),
    "recommendation": Schema([ColSpec(Array(DataType.float), "predicted"), ColSpec(Array(DataType.string), "recommended")]),
}


class CodeAndReconstruction(torch.nn.Module):
    """What a served autoencoder computes: its code and its reconstruction."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.features(x), self.model(x)


def input_schema(column: str, user: bool = False) -> Schema:
    """The input column (plain Python floats; cast to float32 inside), after a `user` id column for
    a model that scores only the users it was trained with."""
    return Schema(([ColSpec(DataType.string, "user")] if user else []) + [ColSpec(Array(DataType.double), column)])


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


def log_model(model: torch.nn.Module, net, input_column: str, classes: list[str], example: np.ndarray, config: dict,
              items: list[str] | None = None, users: list[str] | None = None, known: np.ndarray | None = None):
    """Log the trained net as a pyfunc model (exported program + this model's code) with a
    signature and an input example; also keeps the state dict, the net description (model name,
    hyperparameters, input shape, task: enough to rebuild it with dl.models) and the resolved config.
    `items`: a recommender's item ids in the order of its rating vectors; `users` and `known` (users
    x items): the item-based AutoRec's training matrix, served through dl.models.autorec.FoldIn."""
    model = model.eval()
    input_shape = tuple(net.input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    served = CodeAndReconstruction(model) if net.task == "reconstruction" else model
    args, shapes = (torch.zeros(2, *input_shape),), {"x": {0: batch}}
    if known is not None:
        from dl.models.autorec import FoldIn

        served, input_shape = FoldIn(model, torch.from_numpy(known)), (len(items),)
        args, shapes = (torch.zeros(2, len(items)), torch.zeros(2, dtype=torch.int64)), {"x": {0: batch}, "users": {0: batch}}
    with TORCH_LOCK:
        program = torch.export.export(served, args, dynamic_shapes=shapes)
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
                                             "input_range": _input_range(net, input_column), "items": items,
                                             "users": users}))
        torch.save(model.state_dict(), paths["state_dict"])
        paths["config"].write_text(json.dumps(config, indent=2))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={k: str(v) for k, v in paths.items()},
            signature=ModelSignature(inputs=input_schema(input_column, user=bool(users)), outputs=OUTPUT_SCHEMAS[net.task]),
            input_example=pd.DataFrame(({"user": users[: len(example)]} if users else {})
                                       | {input_column: [row.tolist() for row in example.reshape(len(example), -1)]}),
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"],
        )


def _input_range(net, input_column: str) -> list[float] | None:
    """Pixels are in [0, 1]; ratings in [0 (unrated), max_rating]; table features are any finite value."""
    if input_column == "ratings":
        return [0.0, float(net.params.max_rating)]
    return [0.0, 1.0] if input_column == "pixels" else None


SEQUENCE_OUTPUTS = {
    "classification": OUTPUT_SCHEMAS["classification"],
    "regression": Schema([ColSpec(Array(DataType.double), "forecast")]),
    "language_model": Schema([ColSpec(DataType.double, "bits_per_token"), ColSpec(DataType.string, "generated")]),
    "embedding": Schema([ColSpec(Array(DataType.double), "vector")]),
}


def log_sequence_model(model: torch.nn.Module, net, classes: list[str], text: dict | None, example: list, config: dict):
    """Log a recurrent net (or word vectors) as a pyfunc that takes what a consumer has: raw text
    (`text`: the vocabulary by id, unit, lowercase, token pattern travel in meta.json), a `word`
    (word2vec), a bracketed `tree` (an RNTN; dl/bracketed.py travels as the model's code) or a
    `history` window. The net is compiled with TorchScript (packed sequences do
    not export with torch.export)."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    model = model.eval()
    trees = bool(text) and text.get("format") == "bracketed"  # an RNTN: its tree parser travels with it
    column = "word" if net.task == "embedding" else "tree" if trees else "text" if text else "history"
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"program": Path(tmp, "model.ts"), "meta": Path(tmp, "meta.json"),
                 "state_dict": Path(tmp, "state_dict.pt"), "config": Path(tmp, "config.json")}
        with TORCH_LOCK:
            torch.jit.save(torch.jit.script(model), str(paths["program"]))
        paths["meta"].write_text(json.dumps({"input_shape": list(net.input_shape), "classes": classes, "task": net.task,
                                             "input_column": column, "net": net.to_dict(), "text": text}))
        torch.save(model.state_dict(), paths["state_dict"])
        paths["config"].write_text(json.dumps(config, indent=2))
        inputs = Schema([ColSpec(DataType.string, column)]) if text else input_schema("history")
        params = ParamSchema([ParamSpec("length", DataType.long, 0), ParamSpec("temperature", DataType.double, 1.0),
                              ParamSpec("seed", DataType.long, 0)]) if net.task == "language_model" else None
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(SEQUENCE_PYFUNC_CODE), artifacts={k: str(v) for k, v in paths.items()},
            signature=ModelSignature(inputs=inputs, outputs=SEQUENCE_OUTPUTS[net.task], params=params),
            input_example=pd.DataFrame({column: example}), code_paths=[str(BRACKETED_CODE)] if trees else None,
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"],
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# the epoch figure beside the loss (dl.train.METRICS): its axis label and title
CURVES = {"accuracy": ("accuracy", "Accuracy"), "mae": ("mean absolute error", "Mean absolute error"),
          "mse": ("reconstruction MSE per value", "Reconstruction error"), "te": ("topographic error", "Topographic error"),
          "bpc": ("bits per token", "Bits per token (character)"),
          "rmse": ("RMSE of the ratings", "Rating error (val: held-out ratings)"),
          "pair_accuracy": ("true neighbour / noise decisions right", "Pair accuracy")}


def curves_figure(history: list[dict]):
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    metric = next(m for m in CURVES if m in history[0])
    loss_label = {"accuracy": "cross-entropy loss", "mse": "loss (with the kind's penalty)", "te": "quantization error",
                  "bpc": "cross-entropy (nats per token)", "rmse": "loss (an RBM's: free-energy gap)",
                  "pair_accuracy": "negative-sampling loss per example"}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel=loss_label.get(metric, "mean squared error"), title="Loss")
    ax_acc.plot(epochs, [h[metric] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", label="val")
    ax_acc.set(xlabel="epoch", ylabel=CURVES[metric][0], title=CURVES[metric][1])
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


def trees_figure(model: torch.nn.Module, trees: list[str], vocab: list[str], classes: list[str], lowercase: bool = True):
    """Bracketed trees drawn with every node coloured by the class the RNTN gives it (red: the first
    class, blue: the last), its label in the node; leaves carry their words."""
    from dl import bracketed

    plt = _pyplot()
    ids = {w: i for i, w in enumerate(vocab)}
    fig, axes = plt.subplots(len(trees), 1, figsize=(11, 1.6 * len(trees)), squeeze=False)
    cmap = plt.get_cmap("RdBu")
    for ax, text in zip(axes[:, 0], trees):
        tree = bracketed.parse(text, lowercase)
        x = torch.from_numpy(bracketed.encode(tree, lambda w: ids.get(w, 1), lambda label: -1)[None])
        with torch.no_grad():
            h, _, _ = model.compose(x)
            predicted = model.head(h).argmax(1).tolist()
        place, leaf = {}, iter(range(len(tree.leaves())))
        for i, node in enumerate(tree.nodes()):
            if node.word is not None:
                place[id(node)] = (next(leaf), 0)
                ax.text(place[id(node)][0], -0.55, node.word, ha="center", va="top", fontsize=8)
            else:
                (xa, ya), (xb, yb) = place[id(node.children[0])], place[id(node.children[1])]
                place[id(node)] = ((xa + xb) / 2, max(ya, yb) + 1)
                for cx, cy in ((xa, ya), (xb, yb)):
                    ax.plot([place[id(node)][0], cx], [place[id(node)][1], cy], color="0.6", lw=0.8, zorder=1)
            px, py = place[id(node)]
            ax.scatter([px], [py], s=170, color=cmap(predicted[i] / max(len(classes) - 1, 1)), edgecolor="0.3", zorder=2)
            extreme = predicted[i] in (0, len(classes) - 1)
            ax.text(px, py, classes[predicted[i]], ha="center", va="center", fontsize=7, zorder=3,
                    color="white" if extreme else "black")
        ax.set_xlim(-0.7, max(len(tree.leaves()), 4) - 0.3)
        ax.set_ylim(-1.1, max(p[1] for p in place.values()) + 0.6)
        ax.axis("off")
    fig.suptitle("Every node's class as the model gives it (red: most negative, blue: most positive)", fontsize=10)
    fig.tight_layout()
    return fig


def load_net(model_uri: str):
    """(torch module in eval mode, meta) of a logged model, rebuilt with dl.models from the state
    dict and net description stored with it: for heatmaps, embeddings and fine-tuning."""
    local = mlflow.artifacts.download_artifacts(model_uri)
    return net_from_dir(local)


def logged_meta(model_uri: str) -> dict:
    """A logged model's meta.json (input shape, classes, task, input column) without its weights."""
    try:
        path = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/artifacts/meta.json")
    except Exception:  # a store that cannot fetch one file of a model: the whole model
        path = str(Path(mlflow.artifacts.download_artifacts(model_uri), "artifacts", "meta.json"))
    return json.loads(Path(path).read_text())


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


TASK_FIGURES = ("reconstruction", "clustering")  # the tasks task_figures draws for


@torch.no_grad()
def task_figures(model: torch.nn.Module, task: str, x: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """{artifact path: figure} a model trained without a target adds to its run, drawn from sample
    rows `x` (their labels colour the points): an autoencoder's input/output grid (images) and 2-D
    codes, and an RBM's filters and Gibbs samples; a self-organizing map's U-matrix and hit map."""
    model = model.eval()
    rows = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    if task == "reconstruction":
        figures = {"plots/codes_2d.png": codes_figure(model.features(rows).numpy(), labels, classes)}
        if x.ndim == 4:  # images
            shown = one_per_label(labels, 10)
            figures["plots/reconstructions.png"] = reconstructions_figure(x[shown], model(rows[shown]).numpy())
        if x.ndim == 4 and x.shape[1] == 1 and hasattr(model, "filters"):  # an RBM on grey images
            figures["plots/filters.png"] = grid_figure(model.filters()[:64].numpy(), "Weights of the first 64 hidden units",
                                                       scale=True)
            figures["plots/gibbs_samples.png"] = grid_figure(model.sample(32, GIBBS_STEPS).numpy(),
                                                             f"Samples after {GIBBS_STEPS} Gibbs steps from noise")
        return figures
    if task == "clustering":
        shape = (model.cfg.rows, model.cfg.columns)
        hits = np.bincount(model(rows).argmin(1).numpy(), minlength=shape[0] * shape[1]).reshape(shape)
        return {"plots/u_matrix.png": map_figure(model.u_matrix(), "U-matrix: mean distance to the neighbours' prototypes", "bone"),
                "plots/hit_map.png": map_figure(hits, f"Hit map: best matching unit of {len(x)} validation rows", "viridis")}
    raise ValueError(f"no task figures for task {task!r} (expected one of {TASK_FIGURES})")


GIBBS_STEPS = 1000


def grid_figure(images: np.ndarray, title: str, scale: bool = False):
    """Grey images (n x 1 x height x width) in a grid of 8 columns; `scale`: each to its own range (weights)."""
    plt = _pyplot()
    columns = 8
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.1 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            image = images[i][0]
            ax.imshow(image, cmap="gray", **({} if scale else {"vmin": 0, "vmax": 1}))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def one_per_label(labels: np.ndarray, n: int) -> np.ndarray:
    """Up to n row indices: the first row of each label, in row order, then the other rows."""
    first = np.sort(np.unique(labels, return_index=True)[1])
    return np.concatenate([first, np.setdiff1d(np.arange(len(labels)), first)])[:n]


def reconstructions_figure(images: np.ndarray, rebuilt: np.ndarray):
    """Inputs (top row) over their reconstructions (bottom row); images are channels x height x width."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(images), figsize=(1.2 * len(images), 2.8), squeeze=False)
    for i in range(len(images)):
        for row, image in ((0, images[i]), (1, rebuilt[i])):
            shown = image[0] if image.shape[0] == 1 else np.clip(image.transpose(1, 2, 0), 0, 1)
            axes[row, i].imshow(shown, cmap="gray", vmin=0, vmax=1)
            axes[row, i].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def codes_figure(codes: np.ndarray, labels: np.ndarray, classes: list[str]):
    """Codes in 2-D (their first two principal components when the code is wider), coloured by label."""
    plt = _pyplot()
    centred = codes - codes.mean(0)
    if codes.shape[1] > 2:
        centred = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    xy = np.pad(centred, ((0, 0), (0, max(0, 2 - centred.shape[1]))))
    fig, ax = plt.subplots(figsize=(7, 6))
    if classes and np.allclose(labels, np.round(labels)) and labels.max(initial=0) < len(classes):
        for k, name in enumerate(classes):
            mask = labels == k
            ax.scatter(xy[mask, 0], xy[mask, 1], s=6, label=name, color=plt.cm.tab10(k % 10))
        ax.legend(fontsize=7, markerscale=2)
    else:
        fig.colorbar(ax.scatter(xy[:, 0], xy[:, 1], s=6, c=labels, cmap="viridis"), ax=ax, label="label")
    wide = codes.shape[1] > 2
    ax.set(xlabel="principal component 1" if wide else "code 1", ylabel="principal component 2" if wide else "code 2",
           title=f"Codes ({codes.shape[1]}-d) of {len(codes)} validation rows")
    fig.tight_layout()
    return fig


@torch.no_grad()
def forecast_figure(model: torch.nn.Module, windows: dict, dates: bool = False):
    """Forecast against actual over the val and test windows ({split: DataFrame with end, history,
    target}, sorted by end): one panel for 1 step ahead, one for the last step of the horizon.
    `dates`: the times are seconds since the epoch (UTC), drawn as dates."""
    plt = _pyplot()
    model = model.eval()
    horizon = len(next(iter(windows.values()))["target"].iloc[0])
    steps = sorted({0, horizon - 1})
    fig, axes = plt.subplots(1, len(steps), figsize=(7 * len(steps), 4), squeeze=False)
    for split, frame in windows.items():
        if not len(frame):
            continue
        forecast = model(torch.tensor(np.stack(frame["history"].to_numpy()), dtype=torch.float32)).numpy()
        actual = np.stack(frame["target"].to_numpy())
        end = pd.to_datetime(frame["end"], unit="s") if dates else frame["end"]
        for ax, k in zip(axes[0], steps):
            mae = np.abs(forecast[:, k] - actual[:, k]).mean()
            ax.plot(end, actual[:, k], "-", color="black", lw=1, label="actual" if split == "val" else None)
            ax.plot(end, forecast[:, k], "-", lw=1.2, label=f"forecast, {split} (MAE {mae:.3g})")
    for ax, k in zip(axes[0], steps):
        ax.set(xlabel="window end (time of its last target value)", title=f"{k + 1} step(s) ahead")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def map_figure(values: np.ndarray, title: str, cmap: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    fig.colorbar(ax.imshow(values, cmap=cmap), ax=ax)
    ax.set(xlabel="map column", ylabel="map row", title=title)
    fig.tight_layout()
    return fig
