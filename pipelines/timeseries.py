"""data.kind: timeseries. (time, value) observations -> <name>_observations
`key string (series@time), source string, series string, time double, value double` (data.mode
applies here: append adds new files' observations, merge updates values by series and time),
then, rebuilt by every job from all observations, windows in <name>_train/_val/_test:
`key string (series@start), series string, start double, end double, history array<float>,
target array<float>`: `history` consecutive values from `start`, the next `horizon` values as
`target`, `end` the time of the last target value.

Times are numbers (e.g. a year) or timestamps (as seconds since the epoch, UTC). The split is by
time, so no future leaks into training: a window is train when its end is before val_start, val
when it starts at/after val_start and ends before test_start, test when it starts at/after
test_start; windows straddling a boundary are dropped, as are windows across a gap (a step more
than 1.5 x the series' median step, e.g. where an observation was rejected)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines import records
from pipelines.contract import record_parser
from pipelines.sources import Parser

BASE = ("observations",)
STATE = None
UNIT = "rows"
SPLITS = ("train", "val", "test")
WINDOW_SCHEMA = ("key string, series string, start double, end double, history array<float>, "
                 "target array<float>, split string")


def parser(data, root: str, state) -> Parser:
    t = data.timeseries

    def convert(record: dict) -> dict:
        raw = records.require(record, t.time)
        try:
            time = records.parse_time(raw)
        except ValueError:
            raise records.Invalid(f"column {t.time!r}: expected a number or a timestamp, got {raw!r}") from None
        series = records.text(record, t.series) if t.series else ""
        return {"key": f"{series}@{time!r}", "series": series, "time": time, "value": records.number(record, t.value)}

    return record_parser(root, t.format, "utf-8", "", "series string, time double, value double", convert)


def assign_split(df: DataFrame, data) -> DataFrame:
    return df.withColumn("split", F.lit("observations"))


def to_base(accepted: DataFrame, data, state) -> DataFrame:
    return accepted.select("key", "source", "series", "time", "value", "split")


def windows(observations: pd.DataFrame, history: int, horizon: int, stride: int,
            val_start: float, test_start: float) -> pd.DataFrame:
    """All windows of one series (pandas, so it is testable without Spark)."""
    obs = observations.sort_values("time")
    times, values = obs["time"].to_numpy(), obs["value"].to_numpy(np.float32)
    series = obs["series"].iloc[0] if len(obs) else ""
    size = history + horizon
    steps = np.diff(times)
    gap = steps > 1.5 * np.median(steps) if len(steps) else steps.astype(bool)
    rows = []
    for i in range(0, len(times) - size + 1, stride):
        if gap[i: i + size - 1].any():
            continue
        start, end = times[i], times[i + size - 1]
        if end < val_start:
            split = "train"
        elif start >= val_start and end < test_start:
            split = "val"
        elif start >= test_start:
            split = "test"
        else:
            continue
        rows.append((f"{series}@{float(start)!r}", series, start, end, values[i: i + history], values[i + history: i + size], split))
    return pd.DataFrame(rows, columns=[c.split()[0] for c in WINDOW_SCHEMA.split(", ")])


def derive(tables: dict, data, state) -> dict:
    t = data.timeseries
    args = (t.history, t.horizon, t.stride, records.parse_time(t.val_start), records.parse_time(t.test_start))
    observations = tables["observations"]
    all_windows = observations.select("series", "time", "value").groupBy("series").applyInPandas(
        lambda pdf: windows(pdf, *args), WINDOW_SCHEMA)
    return {split: all_windows.where(F.col("split") == split).drop("split") for split in SPLITS}


def report(tables: dict, data, state, written: dict) -> dict:
    return {"windows": {s: written[s]["rows"] for s in SPLITS}}
