"""MLflow "model from code" for the recurrent models (dl/models/rnn.py). MLflow stores this file
inside every registered version and runs it at load time; the net is a TorchScript program and
the vocabulary and tokenizer travel in meta.json, so consumers need only mlflow, torch, numpy and
pandas: it must never import dlpipe.

Input, by what the model was trained on:
- text (sentiment, language model): a DataFrame with a `text` column of raw strings (or a list of
  strings), tokenized as prepare did (lowercased or not; words by meta's pattern or characters),
  unknown tokens as <unk>, truncated to the trained max_length. A row that is not a string or has
  no token is rejected.
- word vectors (word2vec): a `word` column, one word of the vocabulary per row (lowercased as
  prepare did); an unknown word, or more than one word, is rejected.
- trees (an RNTN): a `tree` column, one bracketed tree per row as prepare reads them, such as
  `(3 (2 not) (3 good))` (the labels must be there, their values are not used), binarized as
  prepare did by `bracketed.py`, which travels as this model's code; unknown words as <unk>. Any
  number of leaves. A row that does not parse is rejected with the character where it fails.
- a time series: a `history` column, one list of `history` finite floats per row.
Rejected rows raise INVALID_PARAMETER_VALUE naming the rows, the reason and what was expected.

Output: classification: `prediction`, `label_name`, `probabilities`; regression: `forecast` (the
next `horizon` values); language_model: `bits_per_token` of the text after its first token
(bits per character for a character-level model) and `generated`: `length` tokens after the text
(params `length` 0, `temperature` 1.0 (0: always the most likely token), `seed` 0); embedding:
`vector`, the word's vector."""

import json
import math
import re

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class SequenceModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with open(context.artifacts["meta"]) as f:
            meta = json.load(f)
        self.task, self.column, self.classes = meta["task"], meta["input_column"], meta["classes"]
        self.width = int(meta["input_shape"][0])  # max_length (text) or history (series)
        text = meta.get("text") or {}
        self.tokens = list(text.get("vocab", []))  # by id: 0 <pad>, 1 <unk>
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.unit, self.lowercase = text.get("unit", "word"), text.get("lowercase", True)
        self.pattern = re.compile(text.get("pattern", r"\w+"))
        self.module = torch.jit.load(context.artifacts["program"]).eval()

    def tokenize(self, value: str) -> list:
        value = value.lower() if self.lowercase else value
        return list(value) if self.unit == "char" else self.pattern.findall(value)

    def expected(self) -> str:
        if self.column == "text":
            return "`text`: a string with at least one token"
        if self.column == "word":
            return f"`word`: one word of the model's vocabulary ({len(self.tokens) - 2} words)"
        if self.column == "tree":
            return "`tree`: a bracketed tree with a label on every node, such as (3 (2 not) (3 good))"
        return f"`history`: {self.width} finite floats per row"

    def _rows(self, model_input) -> list:
        if isinstance(model_input, pd.DataFrame):
            if self.column not in model_input.columns:
                raise MlflowException(f"input has no column {self.column!r} (columns: {list(model_input.columns)}); "
                                      f"expected {self.expected()}", error_code=INVALID_PARAMETER_VALUE)
            return list(model_input[self.column])
        return list(model_input)

    def _check(self, problems: list) -> None:
        rejected = [(i, p) for i, p in enumerate(problems) if p is not None]
        if rejected:
            shown = "; ".join(f"row {i}: {p}" for i, p in rejected[:5]) + ("; ..." if len(rejected) > 5 else "")
            raise MlflowException(f"{len(rejected)} of {len(problems)} input rows rejected ({shown}); "
                                  f"expected {self.expected()}", error_code=INVALID_PARAMETER_VALUE)

    def row_problems(self, rows: list) -> list:
        """Per row: why the model cannot take it, or None (scoring keeps rejected rows with the reason)."""
        if self.column == "history":
            arrays = [None if r is None else np.asarray(r, dtype=np.float32).ravel() for r in rows]
            return [("no value" if a is None else f"{a.size} values") if a is None or a.size != self.width
                    else (None if np.isfinite(a).all() else "a NaN or infinite value") for a in arrays]
        if self.column == "word":
            return [self._word_problem(v) for v in rows]
        if self.column == "tree":
            return [self._tree(v)[1] for v in rows]
        return ["expected a string, got " + type(v).__name__ if not isinstance(v, str)
                else None if self.tokenize(v.strip()) else "no token" for v in rows]

    def _word_problem(self, value):
        if not isinstance(value, str):
            return "expected a string, got " + type(value).__name__
        words = self.tokenize(value.strip())
        if len(words) != 1:
            return f"expected one word, got {len(words)} tokens in {value[:40]!r}"
        return None if self.ids.get(words[0], 1) > 1 else f"unknown word {words[0]!r}"

    def _tree(self, value):
        """(the parsed tree or None, why it cannot be taken or None)."""
        import bracketed  # dl/bracketed.py, this model's code

        if not isinstance(value, str):
            return None, "expected a string, got " + type(value).__name__
        try:
            return bracketed.parse(value, self.lowercase), None
        except ValueError as exc:
            return None, f"not a bracketed tree: {exc}"

    def _trees(self, rows: list) -> torch.Tensor:
        """The rows laid out as the RNTN reads them, padded to the largest tree of the batch."""
        import bracketed

        parsed = [self._tree(v) for v in rows]
        self._check([problem for _, problem in parsed])
        trees = [tree for tree, _ in parsed]
        size = max([len(t.nodes()) for t in trees] + [1])
        rows = [bracketed.encode(t, lambda w: self.ids.get(w, 1), lambda label: -1, size) for t in trees]
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, size * bracketed.WIDTH, dtype=torch.int32)

    def encode(self, rows: list, truncate: bool = True) -> list:
        """Token ids of each row (<unk> = 1); raises naming the rows that have none."""
        self._check(self.row_problems(rows))
        ids = [[self.ids.get(t, 1) for t in self.tokenize(value.strip())] for value in rows]
        return [s[: self.width] for s in ids] if truncate else ids

    def padded(self, sequences: list) -> torch.Tensor:
        x = torch.zeros(len(sequences), max([len(s) for s in sequences] + [1]), dtype=torch.long)
        for i, s in enumerate(sequences):
            x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return x

    def predict(self, context, model_input, params=None):
        rows = self._rows(model_input)
        if self.column == "history":
            return self._forecast(rows)
        if self.task == "language_model":
            return self._language_model(rows, params or {})
        if self.task == "embedding":
            self._check(self.row_problems(rows))
            ids = torch.tensor([self.ids[self.tokenize(v.strip())[0]] for v in rows], dtype=torch.long)
            with torch.no_grad():
                vectors = self.module(ids).double().numpy() if rows else np.zeros((0, 0))
            return pd.DataFrame({"vector": list(vectors)})
        x = self._trees(rows) if self.column == "tree" else self.padded(self.encode(rows))
        with torch.no_grad():
            logits = self.module(x) if rows else torch.zeros(0, len(self.classes))
        probs = torch.softmax(logits.float(), 1).numpy()
        predicted = probs.argmax(axis=1)
        return pd.DataFrame({"prediction": predicted.astype(np.int64), "label_name": [self.classes[i] for i in predicted],
                             "probabilities": list(probs.astype(np.float32))})

    def _forecast(self, rows: list) -> pd.DataFrame:
        self._check(self.row_problems(rows))
        x = torch.from_numpy(np.stack([np.asarray(r, dtype=np.float32).ravel() for r in rows])) if rows \
            else torch.zeros(0, self.width)
        with torch.no_grad():
            out = self.module(x).numpy() if rows else np.zeros((0, 1), np.float32)
        return pd.DataFrame({"forecast": list(out.astype(np.float64))})

    def _language_model(self, rows: list, params: dict) -> pd.DataFrame:
        sequences = self.encode(rows, truncate=False)
        bits = self.bits(sequences)
        length, temperature = int(params.get("length", 0)), float(params.get("temperature", 1.0))
        seed = int(params.get("seed", 0))
        joiner = "" if self.unit == "char" else " "
        generated = [joiner.join(self.tokens[i] for i in sample(self.module, s, length, temperature, seed)) if length else ""
                     for s in sequences]
        return pd.DataFrame({"bits_per_token": bits, "generated": generated})

    def bits(self, sequences: list, batch: int = 256) -> list:
        """Bits per token of each sequence's last `width` tokens after its first (NaN for one token),
        in padded batches (the net packs them: padding changes nothing)."""
        out = []
        with torch.no_grad():
            for at in range(0, len(sequences), batch):
                chunk = [s[-self.width:] for s in sequences[at: at + batch]]
                x = self.padded(chunk)
                logp = torch.log_softmax(self.module(x)[:, :-1].float(), 2)
                target = x[:, 1:]
                nats = -logp.gather(2, target.unsqueeze(2)).squeeze(2) * (target != 0)
                counts = (target != 0).sum(1)
                out += [float(n) / int(k) / math.log(2) if k else float("nan") for n, k in zip(nats.sum(1), counts)]
        return out


def sample(module, prompt: list, length: int, temperature: float, seed: int) -> list:
    """The loop of dl.models.rnn.sample over the scripted `step` (kept identical: a test compares them)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long)
    h = c = torch.zeros(0)
    out, first = [], True
    with torch.no_grad():
        for _ in range(length):
            logits, h, c = module.step(ids, h, c, first)
            first = False
            logits[0, 0] = float("-inf")  # never <pad>
            if temperature <= 0:
                nxt = int(logits[0].argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(logits[0].float() / temperature, 0), 1, generator=generator))
            out.append(nxt)
            ids = torch.tensor([[nxt]], dtype=torch.long)
    return out


mlflow.models.set_model(SequenceModel())
