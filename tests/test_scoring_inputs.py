"""The registered model refuses inputs it cannot score (issue 12, defect 7): NaN, infinite,
out-of-range and wrong-length rows. The pyfunc (what `mlflow models serve` runs) raises naming the
rows, the reason, the expected shape and range; the Spark scoring path keeps such rows, without a
prediction, with the reason."""

import mlflow
import pandas as pd
import pytest

from dlpipe.scoring import predict

GOOD, NAN, INF = [0.5] * 784, [float("nan")] * 784, [0.5] * 783 + [float("inf")]
EXPECTED = "expected `pixels`: 784 finite floats per row (input shape (1, 28, 28)) in [0, 1]"


def _uri(registered_small):
    cfg, evaluated = registered_small
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    return f"models:/{evaluated['model_name']}/{evaluated['model_version']}"


def test_pyfunc_rejects_nan_infinite_out_of_range_and_wrong_length_rows(registered_small):
    model = mlflow.pyfunc.load_model(_uri(registered_small))
    assert len(model.predict(pd.DataFrame({"pixels": [GOOD, GOOD]}))) == 2
    for bad, reason in ((NAN, "a NaN or infinite value"), (INF, "a NaN or infinite value"),
                        ([2.0] * 784, "a value out of range"), ([0.5] * 10, "10 values")):
        with pytest.raises(Exception) as caught:
            model.predict(pd.DataFrame({"pixels": [GOOD, bad]}))
        assert f"1 of 2 input rows rejected (row 1: {reason}); {EXPECTED}" in str(caught.value)


def test_spark_scoring_keeps_rejected_rows_with_the_reason(spark, registered_small):
    rows = [("good", 0, GOOD), ("nan", 1, NAN), ("inf", 2, INF), ("short", 3, [0.5] * 10),
            ("big", 4, [2.0] * 784), ("null", 5, None)]
    frame = spark.createDataFrame(rows, "key string, label int, pixels array<float>").repartition(2)
    out = {r["key"]: r for r in predict(spark, frame, _uri(registered_small)).collect()}
    assert set(out) == {key for key, *_ in rows}  # nothing dropped
    assert out["good"]["rejected_reason"] is None and out["good"]["prediction"] is not None
    assert len(out["good"]["probabilities"]) == 10
    for key, reason in (("nan", "a NaN or infinite value"), ("inf", "a NaN or infinite value"), ("short", "10 values"),
                        ("big", "a value out of range"), ("null", "no value")):
        assert out[key]["prediction"] is None and out[key]["probabilities"] is None, key
        assert out[key]["rejected_reason"] == f"{reason}; {EXPECTED}", key
        assert out[key]["label"] == dict((k, lab) for k, lab, _ in rows)[key]
