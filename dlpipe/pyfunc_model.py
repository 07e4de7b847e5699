"""MLflow "model from code" for every dlpipe model. MLflow stores this file inside every
registered version and runs it at load time, so consumers need only mlflow, torch, numpy and
pandas: it must never import dlpipe.

Input: a DataFrame with the model's input column: `pixels` (images: one flat list of
channels*height*width floats in [0, 1] per row, channels first) or `features` (tables: one list
of floats per row), or an array of that shape. Output, by the model's task: classification:
`prediction` (class index), `label_name` and `probabilities` (one per class); regression:
`prediction` (a double)."""

import json

import mlflow
import numpy as np
import pandas as pd
import torch


class TorchModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with open(context.artifacts["meta"]) as f:
            meta = json.load(f)
        self.input_shape = tuple(meta["input_shape"])  # (channels, height, width)
        self.classes = meta["classes"]
        self.task = meta.get("task", "classification")
        self.column = meta.get("input_column", "pixels")
        self.module = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            values = np.stack([np.asarray(p, dtype=np.float32) for p in model_input[self.column]]) if len(model_input) else np.zeros((0, int(np.prod(self.input_shape))), np.float32)
        else:
            values = np.asarray(model_input, dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(-1, *self.input_shape))
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
