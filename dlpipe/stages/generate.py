"""`dlpipe generate`: text from a language model (model.task language_model): the prompt, then
`length` tokens sampled at `temperature` (0: always the most likely token, deterministic). It runs
the registered pyfunc itself, as a consumer would (dlpipe/pyfunc_sequence.py)."""

from __future__ import annotations

import math

import mlflow
import pandas as pd

from dlpipe import tracking
from dlpipe.config import MlflowConfig
from dlpipe.errors import ConfigError, InputNotFound


def run(mlflow_cfg: MlflowConfig, *, model_uri: str, prompt: str, length: int, temperature: float, seed: int = 0) -> dict:
    if length < 0:
        raise ConfigError(f"--length: expected a non-negative number of tokens, got {length}")
    if temperature < 0:
        raise ConfigError(f"--temperature: expected a number >= 0 (0 = the most likely token), got {temperature}")
    tracking.setup(mlflow_cfg)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # an unknown run, name, version or alias
        raise InputNotFound(f"--model {model_uri}: cannot load it ({type(exc).__name__}: {str(exc)[:200]})") from None
    outputs = model.metadata.get_output_schema()
    if outputs is None or "generated" not in outputs.input_names():
        raise ConfigError(f"--model {model_uri}: not a language model (model.task language_model); it cannot generate")
    out = model.predict(pd.DataFrame({"text": [prompt]}), params={"length": length, "temperature": temperature, "seed": seed})
    generated = str(out["generated"].iloc[0])
    bits = float(out["bits_per_token"].iloc[0])  # NaN for a one-token prompt: nothing to score
    joiner = "" if _char_level(model) else " "
    return {"step": "generate", "model_uri": model_uri, "prompt": prompt, "length": length, "temperature": temperature,
            "seed": seed, "generated": generated, "text": prompt + joiner + generated,
            "prompt_bits_per_token": None if math.isnan(bits) else bits}


def _char_level(model) -> bool:
    return getattr(model.unwrap_python_model(), "unit", "word") == "char"
