"""`dlpipe bench models --family recurrent`: dlpipe's recurrent nets against measured baselines on
the same tables (the newest prepared versions of each conf's data), every figure on the test split:

- sentiment (conf/reviews_sentiment.yaml): ROC AUC of the LSTM vs Spark ML TF-IDF + LogisticRegression
  fitted on the same train rows;
- forecast_sunspots, forecast_elec_equip: MAE over the test windows' horizon vs the seasonal naive
  forecast and the statsmodels ARIMA or ETS model of lowest AIC, fitted on the train span and run
  over each test window's past (parameters fixed);
- char_lm (conf/gutenberg_chars.yaml): test bits per character vs an interpolated Kneser-Ney
  character n-gram (n = 1..6, best n on val) fitted on as many train lines as the net saw;
- long_range: the adding problem (benchmarks/long_range.py), rnn/lstm/gru test MSE.
Each case reports its wall time and training samples/s."""

from __future__ import annotations

import dataclasses as dc
import math
import time
from collections import Counter, defaultdict

import numpy as np
import torch

from benchmarks import long_range
from benchmarks.common import say
from dl.models import build
from dlpipe import lake, modeling
from dlpipe.config import load_config
from dlpipe.launchers import TrainTask, launch, load_shard
from dlpipe.refs import TableRef

CONFS = {"sentiment": "conf/reviews_sentiment.yaml", "forecast_sunspots": "conf/sunspots.yaml",
         "forecast_elec_equip": "conf/elec_equip.yaml", "char_lm": "conf/gutenberg_chars.yaml"}
SEASONS = {"forecast_sunspots": 11, "forecast_elec_equip": 12}  # sunspot cycle (years), months


def _conf(base, path: str, overrides: list[str]):
    """The case's conf with the run's paths, tracking, spark and train backend (the bench's --conf/--set)."""
    keep = [f"paths.lake={base.paths.lake}", f"mlflow.tracking_uri={base.mlflow.tracking_uri}",
            f"train.backend={base.train.backend}", f"train.num_workers={base.train.num_workers}"]
    return load_config(path, keep + overrides)


def _trained(spark, cfg, epochs: int | None = None, max_rows: int = 0):
    """(model, result, tables, sequence setup, wall s): the case's conf trained through its launcher."""
    tables = {s: TableRef(cfg.table_uri(s), lake.latest_version(cfg.table_uri(s))) for s in ("train", "val", "test")}
    for split, ref in tables.items():
        if ref.version is None:
            raise FileNotFoundError(f"no Delta table at {ref.uri}: run `dlpipe land` and `dlpipe prepare` with its conf")
    column, shape = modeling.input_of(spark, tables["val"], cfg.data)
    sequence = modeling.sequence_setup(spark, cfg.model, tables, cfg.data)
    net = modeling.net_for(cfg.model, cfg.data.name, column, shape, len(sequence["classes"]), sequence)
    fit = dc.replace(cfg.train, epochs=epochs or cfg.train.epochs, max_rows=max_rows or cfg.train.max_rows, checkpoint_every=0)
    files = {s: lake.table_files(r.uri, r.version) for s, r in tables.items()}
    workers = 1 if fit.backend == "local" else fit.num_workers
    task = TrainTask(net=net, train=fit, train_files=files["train"], val_files=files["val"],
                     threads=max(1, torch.get_num_threads() // workers))
    started = time.perf_counter()
    result = launch(spark, task, fit.backend, fit.num_workers)
    model = build(net)
    model.load_state_dict(result["state_dict"])
    return model.eval(), result, files, sequence, time.perf_counter() - started


def _speed(result) -> float:
    return float(np.mean([h["samples_per_sec"] for h in result["history"]]))


def sentiment(spark, cfg, epochs=None, max_rows=0) -> dict:
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.feature import IDF, HashingTF
    from sklearn.metrics import roc_auc_score

    model, result, files, _, wall = _trained(spark, cfg, epochs, max_rows)
    x, y = load_shard(files["test"], (cfg.data.text.max_length,), 0, 1)
    with torch.no_grad():
        scores = torch.cat([torch.softmax(model(torch.from_numpy(x[i:i + 512])), 1)[:, 1] for i in range(0, len(x), 512)])
    auc = roc_auc_score(y, scores.numpy())
    started = time.perf_counter()
    read = {s: lake.read_table(spark, cfg.table_uri(s), lake.latest_version(cfg.table_uri(s))).select("tokens", "label")
            for s in ("train", "test")}
    if max_rows:
        read["train"] = read["train"].limit(max_rows)
    pipe = Pipeline(stages=[HashingTF(inputCol="tokens", outputCol="tf", numFeatures=1 << 18),
                            IDF(inputCol="tf", outputCol="features"), LogisticRegression(maxIter=100, regParam=0.01)])
    fitted = pipe.fit(read["train"])
    baseline = BinaryClassificationEvaluator(metricName="areaUnderROC").evaluate(fitted.transform(read["test"]))
    return {"dlpipe_auc": auc, "baseline_auc": baseline, "baseline": "Spark ML HashingTF(2^18) + IDF + LogisticRegression",
            "dlpipe_wall_s": wall, "dlpipe_samples_per_sec": _speed(result), "baseline_wall_s": time.perf_counter() - started,
            "test_rows": len(y)}


def _windows(spark, cfg, split):
    uri = cfg.table_uri(split)
    return lake.read_table(spark, uri, lake.latest_version(uri)).select("start", "end", "history", "target").toPandas().sort_values("end")


def forecast(spark, cfg, name: str, epochs=None) -> dict:
    import warnings

    from statsmodels.tsa.arima.model import ARIMA
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    model, result, _, _, wall = _trained(spark, cfg, epochs)
    test, train = _windows(spark, cfg, "test"), _windows(spark, cfg, "train")
    hx, hy = np.stack(test["history"].to_numpy()).astype(np.float32), np.stack(test["target"].to_numpy())
    with torch.no_grad():
        dl_mae = float(np.abs(model(torch.from_numpy(hx)).numpy() - hy).mean())
    horizon, m = hy.shape[1], SEASONS[name]
    naive = np.stack([[h[len(h) - m + (k % m)] for k in range(horizon)] for h in hx])
    started = time.perf_counter()
    # the train span as one series: the first window's history, then each window's last target value
    span = np.concatenate([np.asarray(train["history"].iloc[0]), *[np.asarray(t[-1:]) for t in train["target"]]])
    candidates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for order in [(p, d, q) for p in (1, 2, 3) for d in (0, 1) for q in (0, 1, 2)]:
            try:
                candidates.append((ARIMA(span, order=order).fit().aic, f"ARIMA{order}", "arima", order))
            except Exception:  # noqa: BLE001 - an order that does not fit is skipped
                pass
        for trend in (None, "add"):
            fitted = ExponentialSmoothing(span, trend=trend).fit()
            candidates.append((fitted.aic, f"ETS(trend={trend})", "ets", trend))
        aic, label, kind, spec = min(candidates, key=lambda c: c[0])
        fitted = ARIMA(span, order=spec).fit() if kind == "arima" else ExponentialSmoothing(span, trend=spec).fit()
        stat = []
        for h in hx:  # the same parameters run over each test window's history
            if kind == "arima":
                stat.append(fitted.apply(np.asarray(h, float)).forecast(horizon))
            else:
                stat.append(ExponentialSmoothing(np.asarray(h, float), trend=spec).fit(
                    smoothing_level=fitted.params["smoothing_level"], optimized=False,
                    smoothing_trend=fitted.params["smoothing_trend"] if spec else None).forecast(horizon))
    return {"dlpipe_mae": dl_mae, "naive_mae": float(np.abs(naive - hy).mean()), "arima_mae": float(np.abs(np.stack(stat) - hy).mean()),
            "arima_model": label, "arima_aic": float(aic), "season": m, "horizon": horizon, "test_windows": len(hy),
            "dlpipe_wall_s": wall, "dlpipe_samples_per_sec": _speed(result), "baseline_wall_s": time.perf_counter() - started}


class KneserNey:
    """Interpolated Kneser-Ney over characters (discount 0.75), orders 1..n; lines start with n-1 pads."""

    def __init__(self, n: int, lines: list[str], discount: float = 0.75):
        self.n, self.d = n, discount
        self.counts = [defaultdict(Counter) for _ in range(n)]  # order k: context (k chars) -> next char counts
        for line in lines:
            padded = "\0" * (n - 1) + line
            for i in range(n - 1, len(padded)):
                for k in range(n):
                    self.counts[k][padded[i - k:i]][padded[i]] += 1
        # continuation counts for lower orders: in how many distinct contexts a char follows a shorter one
        self.cont = [defaultdict(Counter) for _ in range(n)]
        for k in range(1, n):
            for ctx, nxt in self.counts[k].items():
                for ch in nxt:
                    self.cont[k - 1][ctx[1:]][ch] += 1
        self.vocab = set(self.counts[0][""])

    def prob(self, ctx: str, ch: str) -> float:
        p = 1.0 / (len(self.vocab) + 1)  # uniform floor, unseen characters included
        for k in range(self.n):
            table = (self.cont[k] if k < self.n - 1 else self.counts[k]).get(ctx[len(ctx) - k:] if k else "")
            if not table:
                continue
            total = sum(table.values())
            p = max(table[ch] - self.d, 0) / total + self.d * len(table) / total * p
        return p

    def bits(self, lines: list[str]) -> tuple[float, int]:
        total, n = 0.0, 0
        for line in lines:
            padded = "\0" * (self.n - 1) + line
            for i in range(self.n, len(padded)):  # every character after the first, as the net predicts
                total -= math.log2(self.prob(padded[i - self.n + 1:i], padded[i]))
                n += 1
        return total, n


def char_lm(spark, cfg, epochs=None, max_rows=0, test_lines=4000) -> dict:
    """The net and the n-gram are scored on the same first `test_lines` lines of the test table; the
    n-gram is fitted on as many train lines as the net trained on (the first ones, not the same rows:
    the workers read row groups round-robin)."""
    model, result, files, _, wall = _trained(spark, cfg, epochs, max_rows)
    uri = cfg.table_uri("test")
    test = lake.read_table(spark, uri, lake.latest_version(uri)).select("key", "ids", "tokens").orderBy("key") \
        .limit(test_lines).toPandas()
    x = np.stack(test["ids"].to_numpy()).astype(np.int64)
    bits = chars = 0.0
    with torch.no_grad():
        for i in range(0, len(x), 256):
            batch = torch.from_numpy(x[i:i + 256])
            loss, _ = model.objective(batch, torch.zeros(len(batch)))
            n = float((batch[:, 1:] != 0).sum())
            bits, chars = bits + float(loss) * n / math.log(2), chars + n
    started = time.perf_counter()
    lines = {}
    for split, count in (("train", result["train_rows"]), ("val", 2000)):
        uri = cfg.table_uri(split)
        rows = lake.read_table(spark, uri, lake.latest_version(uri)).select("tokens").limit(count).toPandas()
        lines[split] = ["".join(t[:cfg.data.text.max_length]) for t in rows["tokens"]]
    lines["test"] = ["".join(t[:cfg.data.text.max_length]) for t in test["tokens"]]
    by_n = {}
    for n in range(1, 7):
        kn = KneserNey(n, lines["train"])
        val_bits, val_n = kn.bits(lines["val"][:2000])
        by_n[n] = (val_bits / max(val_n, 1), kn)
    best = min(by_n, key=lambda n: by_n[n][0])
    test_bits, test_n = by_n[best][1].bits(lines["test"])
    return {"dlpipe_bpc": bits / max(chars, 1), "ngram_bpc": test_bits / max(test_n, 1), "ngram_n": best,
            "ngram_val_bpc": {n: v[0] for n, v in by_n.items()}, "ngram_train_lines": len(lines["train"]),
            "test_lines": len(x), "train_rows": result["train_rows"], "epochs": len(result["history"]),
            "dlpipe_wall_s": wall, "dlpipe_samples_per_sec": _speed(result), "baseline_wall_s": time.perf_counter() - started}


# Each case's size, so that the whole family runs in under 30 minutes on 2 cores (about 13 on a quiet
# machine: docs/performance.md): the confs' models, fewer epochs and rows where a full run would not fit.
SIZES = {"sentiment": {"epochs": 6},  # 18.6k train rows, ~530 samples/s on a quiet machine -> ~2 min of training
         "forecast_sunspots": {}, "forecast_elec_equip": {},  # the confs' epochs: a few hundred windows
         "char_lm": {"epochs": 1, "max_rows": 30_000},  # 2 x 256 LSTM, ~120 lines/s -> ~4.5 min of training
         "long_range": {}}  # benchmarks/long_range.py's defaults


def run(spark, cfg, *, cases: tuple[str, ...] = tuple(SIZES), epochs: int | None = None, max_rows: int = 0) -> dict:
    """`cfg`: the bench's --conf/--set (paths.lake, tracking, train.backend); each case reads its own conf.
    `epochs` and `max_rows` (when given) replace SIZES for the cases trained on tables."""
    import mlflow

    from dlpipe import tracking

    summary: dict = {"step": "bench models", "family": "recurrent", "backend": cfg.train.backend,
                     "threads": torch.get_num_threads(), "cases": {}}
    for name in cases:
        started = time.perf_counter()
        say(f"recurrent: {name}")
        size = SIZES[name] | ({"epochs": epochs} if epochs else {}) | ({"max_rows": max_rows} if max_rows else {})
        if name == "long_range":
            case, figure = long_range.run(log=say)
            tracking.setup(cfg.mlflow)
            with mlflow.start_run(run_name="bench-long-range"):
                mlflow.set_tags({"dlpipe.step": "bench", "dlpipe.bench": "long_range"})
                mlflow.log_metrics({k: v for k, v in case.items() if k.endswith("_mse") and isinstance(v, float)})
                mlflow.log_figure(figure, "plots/vanishing_gradient.png")
        else:
            case_cfg = _conf(cfg, CONFS[name], [])
            if name == "sentiment":
                case = sentiment(spark, case_cfg, size.get("epochs"), size.get("max_rows", 0))
            elif name == "char_lm":
                case = char_lm(spark, case_cfg, size.get("epochs"), size.get("max_rows", 0))
            else:
                case = forecast(spark, case_cfg, name, size.get("epochs"))
        summary["cases"][name] = case | {"case_wall_s": time.perf_counter() - started}
    return summary
