"""MLflow "model from code" for every dlpipe model. MLflow stores this file inside every
registered version and runs it at load time, so consumers need only mlflow, torch, numpy and
pandas: it must never import dlpipe.

Input: a DataFrame with the model's input column: `pixels` (images: one flat list of
channels*height*width floats in [0, 1] per row, channels first) or `features` (tables: one list
of floats per row), or an array of that shape. A row with another length, a missing value, a NaN
or infinite value, or (images) a value outside [0, 1] is rejected: predict raises an
INVALID_PARAMETER_VALUE error (`mlflow models serve` answers it with HTTP 400) naming the rows, the reason
and the expected shape and range. Output, by the model's task: classification: `prediction`
(class index), `label_name` and `probabilities` (one per class); regression: `prediction` (a double);
reconstruction (autoencoders): `code` (the encoder's output) and `reconstruction_error` (mean squared
error per value); clustering (self-organizing maps): `bmu` (the best matching unit, row-major),
`bmu_row`, `bmu_col` and `quantization_error` (the distance to that unit's prototype); recommendation
(collaborative filtering; input `ratings`: a user's ratings of every item, 0 for unrated, in the
order of the model's `items`): `predicted` (a rating for every item) and `recommended` (the ids of
the TOP_K items with the highest predicted rating the user has not rated, best first). An
item-based recommender (its meta names `users`) also needs a `user` column: it scores only the users
of its training matrix, and rejects the rows of any other; two rows of one user in a batch are each
scored with their own ratings."""

import json

TOP_K = 10

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


def _refuse(problems: list, tail: str = "") -> None:
    """Raise naming the rejected rows (the first 5) when any per-row problem is not None."""
    rejected = [(i, p) for i, p in enumerate(problems) if p is not None]
    if rejected:
        shown = "; ".join(f"row {i}: {p}" for i, p in rejected[:5]) + ("; ..." if len(rejected) > 5 else "")
        raise MlflowException(f"{len(rejected)} of {len(problems)} input rows rejected ({shown}){tail}",
                              error_code=INVALID_PARAMETER_VALUE)


class TorchModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with open(context.artifacts["meta"]) as f:
            meta = json.load(f)
        self.input_shape = tuple(meta["input_shape"])  # (channels, height, width) or (features,)
        self.width = int(np.prod(self.input_shape))
        self.classes = meta["classes"]
        self.task = meta.get("task", "classification")
        self.column = meta.get("input_column", "pixels")
        # pixels are in [0, 1] (prepare scales them); table features are standardized: any finite value
        self.value_range = meta.get("input_range", [0.0, 1.0] if self.column == "pixels" else None)
        self.module = torch.export.load(context.artifacts["program"]).module()
        self.map_columns = meta.get("net", {}).get("params", {}).get("columns", 1)  # a self-organizing map's width
        self.items = meta.get("items") or []  # a recommender's item ids, in rating-vector order
        self.users = meta.get("users") or []  # an item-based recommender's users: the rows of its training matrix
        self.user_index = {u: i for i, u in enumerate(self.users)}

    def expected(self) -> str:
        bounds = f" in [{self.value_range[0]:g}, {self.value_range[1]:g}]" if self.value_range else ""
        return f"`{self.column}`: {self.width} finite floats per row (input shape {self.input_shape}){bounds}"

    def row_problems(self, x: np.ndarray) -> list:
        """x: rows x width floats. Per row: None when it can be scored, else why not."""
        finite = np.isfinite(x).all(axis=1) if x.size else np.ones(len(x), bool)
        inside = np.ones(len(x), bool)
        if self.value_range and x.size:
            with np.errstate(invalid="ignore"):
                inside = ((x >= self.value_range[0]) & (x <= self.value_range[1])).all(axis=1)
        return [None if ok and within else ("a NaN or infinite value" if not ok else "a value out of range")
                for ok, within in zip(finite, inside)]

    def user_problems(self, users) -> list:
        """Per user id: None when the item-based model can score them, else why not."""
        return [None if u in self.user_index else f"user {u!r} is not in the model's training matrix "
                f"({len(self.users)} users): an item-based recommender scores only those" for u in users]

    def _user_positions(self, model_input) -> torch.Tensor:
        """The positions of the input's `user` column in the training matrix; raises naming every rejected row."""
        if not isinstance(model_input, pd.DataFrame) or "user" not in model_input.columns:
            raise MlflowException(f"an item-based recommender needs a `user` column (a user id of its training matrix) "
                                  f"beside {self.expected()}", error_code=INVALID_PARAMETER_VALUE)
        users = [str(u) for u in model_input["user"]]
        _refuse(self.user_problems(users))
        return torch.tensor([self.user_index[u] for u in users], dtype=torch.int64)

    def _fold_in(self, x: torch.Tensor, users: torch.Tensor) -> np.ndarray:
        """An item-based recommender over rounds in which each user appears once: two rows of one user
        (two sets of known ratings) are each scored with their own ratings, not the last row's."""
        occurrence, seen = np.zeros(len(users), np.int64), {}
        for i, u in enumerate(users.tolist()):
            occurrence[i] = seen[u] = seen.get(u, -1) + 1
        predicted = np.zeros((len(x), self.width), np.float32)
        for r in range(int(occurrence.max()) + 1 if len(x) else 0):
            rows = torch.from_numpy(np.flatnonzero(occurrence == r))
            predicted[rows.numpy()] = self.module(x[rows], users[rows]).numpy()
        return predicted

    def length_problem(self, length) -> str:
        return "no value" if length is None else f"{length} values"

    def _matrix(self, model_input) -> np.ndarray:
        """The input as a rows x width float32 matrix; raises naming every rejected row."""
        if isinstance(model_input, pd.DataFrame):
            x, problems = self._from_rows(list(model_input[self.column]) if len(model_input) else [])
        else:
            values = np.asarray(model_input, dtype=np.float32)
            if values.ndim >= 1 and values.size == len(values) * self.width:  # the common case: one matrix, no copy
                x = values.reshape(len(values), self.width)
                problems = self.row_problems(x)
            else:
                x, problems = self._from_rows(list(values) if values.ndim >= 1 else [values])
        _refuse(problems, f"; expected {self.expected()}")
        return x

    def _from_rows(self, rows: list):
        arrays = [None if r is None else np.asarray(r, dtype=np.float32).ravel() for r in rows]
        problems = [None if a is not None and a.size == self.width else self.length_problem(None if a is None else a.size)
                    for a in arrays]
        good = [i for i, p in enumerate(problems) if p is None]
        x = np.stack([arrays[i] for i in good]) if good else np.zeros((0, self.width), np.float32)
        for i, p in zip(good, self.row_problems(x)):
            problems[i] = p
        return x, problems

    def predict(self, context, model_input, params=None):
        x = torch.from_numpy(np.ascontiguousarray(self._matrix(model_input)).reshape(-1, *self.input_shape))
        if self.task == "reconstruction":
            with torch.no_grad():
                code, rebuilt = self.module(x) if len(x) else (torch.zeros(0, 1), x)
            error = (rebuilt - x).reshape(len(x), -1).pow(2).mean(1).double().numpy()
            return pd.DataFrame({"code": list(code.numpy().astype(np.float32)), "reconstruction_error": error})
        if self.task == "clustering":
            with torch.no_grad():
                d2 = self.module(x).numpy() if len(x) else np.zeros((0, 1), np.float32)
            bmu = d2.argmin(axis=1).astype(np.int64)
            error = np.sqrt(np.maximum(d2[np.arange(len(bmu)), bmu], 0)).astype(np.float64)
            return pd.DataFrame({"bmu": bmu, "bmu_row": bmu // self.map_columns, "bmu_col": bmu % self.map_columns,
                                 "quantization_error": error})
        if self.task == "recommendation":
            with torch.no_grad():
                if self.users:
                    predicted = self._fold_in(x, self._user_positions(model_input))
                else:
                    predicted = self.module(x).numpy() if len(x) else np.zeros((0, self.width), np.float32)
            ranked = np.argsort(-np.where(x.numpy() > 0, -np.inf, predicted), axis=1, kind="stable")
            unrated = (x.numpy() == 0).sum(axis=1)
            return pd.DataFrame({"predicted": list(predicted.astype(np.float32)),
                                 "recommended": [[self.items[i] for i in row[: min(TOP_K, n)]] for row, n in zip(ranked, unrated)]})
        if self.task == "regression":
            with torch.no_grad():
                out = self.module(x).reshape(-1).numpy() if len(x) else np.zeros(0, np.float32)
            return pd.DataFrame({"prediction": out.astype(np.float64)})
        with torch.no_grad():
            probs = torch.softmax(self.module(x), dim=1).numpy() if len(x) else np.zeros((0, len(self.classes)), np.float32)
        predicted = probs.argmax(axis=1)
        return pd.DataFrame(
            {
                "prediction": predicted.astype(np.int64),
                "label_name": [self.classes[i] for i in predicted],
                "probabilities": list(probs.astype(np.float32)),
            }
        )


mlflow.models.set_model(TorchModel())
