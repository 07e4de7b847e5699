"""`dlpipe bench models --family feedforward`: every figure in one run on the same Delta tables,
dlpipe's distributed loop against well-known baselines. The CNN baseline is benchmarks.plain_loop
with dlpipe's net, epochs, global batch, learning rate and cosine schedule and the same torch
thread budget; the one difference, written into the summary, is the layout: one process with
all the threads against train.num_workers processes sharing them."""

from __future__ import annotations

import dataclasses as dc
import os
import time

import torch

from benchmarks.common import arrays, dlpipe_run, latest_tables
from benchmarks.plain_loop import plain_fit
from dl.models import build
from dl.train import TrainConfig
from dlpipe import lake, modeling
from dlpipe.config import Config
from dlpipe.launchers import TrainTask
from dlpipe.refs import TableRef
from dlpipe.scoring import binary_auc

FAMILIES = ("feedforward", "autoencoders", "recurrent", "energy", "embeddings")
FASHION_FIRST, FASHION_SECOND = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def _say(line: str) -> None:
    print(f"bench models: {line}", flush=True)


def _run(spark, net, fit, train_files, test_files, backend, workers, threads, **extra) -> dict:
    task = TrainTask(net=net, train=fit, train_files=train_files, val_files=test_files, threads=threads, **extra)
    r = dlpipe_run(spark, task, backend, workers)
    return {"test_accuracy": r["test_accuracy"], "train_wall_s": r["train_wall_s"], "epochs": fit.epochs,
            "backend": r["backend"], "world_size": r["world_size"], "state_dict": r["state_dict"],
            "train_rows": r["train_rows"], "lr_schedule": fit.lr_schedule, "torch_threads_per_worker": threads}


def _sklearn_mlp(hidden: list[int], epochs: int, batch_size: int, lr: float, train, test, seed: int) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=epochs, batch_size=batch_size,
                        learning_rate_init=lr, random_state=seed)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter = the same epoch budget on purpose
        clf.fit(train[0].reshape(len(train[0]), -1), train[1])
    seconds = time.perf_counter() - started
    accuracy = float((clf.predict(test[0].reshape(len(test[0]), -1)) == test[1]).mean())
    return {"test_accuracy": accuracy, "train_wall_s": seconds, "epochs": clf.n_iter_}


def run(spark, cfg: Config, family: str = "feedforward", adult_conf: str = "conf/adult_mlp.yaml",
        cnn_epochs: int = 6, mlp_epochs: int = 8, pretrain_epochs: int = 2, finetune_epochs: int = 30,
        finetune_fraction: float = 0.01) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} (expected one of {list(FAMILIES)})")
    if family == "autoencoders":
        from benchmarks import autoencoders

        return autoencoders.run(spark, cfg)
    if family == "recurrent":
        from benchmarks import recurrent

        return recurrent.run(spark, cfg)
    if family == "energy":
        from benchmarks import energy

        return energy.run(spark, cfg)
    if family == "embeddings":
        from benchmarks import embeddings

        return embeddings.run(spark, cfg)
    t, threads = cfg.train, max(1, torch.get_num_threads())
    backend, workers = t.backend, t.num_workers
    processes = 1 if backend == "local" else workers
    per_worker_threads = max(1, threads // processes)
    tables = latest_tables(cfg, hint="run `dlpipe land-demo-data` and `dlpipe prepare` first")
    files = {split: lake.table_files(*ref) for split, ref in tables.items()}
    files |= {f"{split}_table": "%s@%s" % ref for split, ref in tables.items()}
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    summary: dict = {"step": "bench models", "family": family, "tables": {k: v for k, v in files.items() if k.endswith("_table")},
                     "backend": backend, "workers": workers, "threads": threads, "cases": {}}
    test = arrays(files["test"], shape)
    base_fit = TrainConfig(epochs=cnn_epochs, batch_size=t.batch_size, lr=t.lr, lr_schedule="cosine", seed=t.seed,
                           checkpoint_every=0)

    # 1. CNN on Fashion-MNIST vs the plain loop: same net, epochs, global batch, lr, cosine schedule, thread budget
    net = modeling.image_net(dc.replace(cfg.model, name="cnn", task="classification"), cfg.data)
    _say(f"CNN {net.params} on {files['train_table']}, {cnn_epochs} epochs, {backend} x {workers}")
    ours = _run(spark, net, base_fit, files["train"], files["test"], backend, workers, per_worker_threads)
    ours.pop("state_dict")
    train = arrays(files["train"], shape)
    plain = plain_fit(net, train, test, epochs=cnn_epochs, batch_size=t.batch_size * processes, lr=t.lr,
                      lr_schedule="cosine", seed=t.seed, threads=per_worker_threads * processes)
    plain.pop("history")
    summary["cases"]["cnn_fashion_mnist"] = {
        "dlpipe": ours, "plain_pytorch_same_schedule": plain, "goal": "dlpipe test_accuracy >= 0.91",
        "differs_by": f"layout only: the plain loop is 1 process x {plain['torch_threads']} torch threads; dlpipe is "
                      f"{processes} process(es) x {per_worker_threads} thread(s) ({backend})"}
    _say(f"CNN: dlpipe {ours['test_accuracy']:.4f} in {ours['train_wall_s']:.0f} s; plain loop {plain['test_accuracy']:.4f} "
         f"in {plain['train_wall_s']:.0f} s (same {cnn_epochs} epochs and cosine schedule)")
    torch.set_num_threads(threads)

    # 2. MLP on Fashion-MNIST vs scikit-learn's MLPClassifier, same hidden sizes and epochs
    mlp_net = modeling.image_net(dc.replace(cfg.model, name="mlp", task="classification"), cfg.data)
    mlp_fit = dc.replace(base_fit, epochs=mlp_epochs, lr=0.001)
    ours = _run(spark, mlp_net, mlp_fit, files["train"], files["test"], backend, workers, per_worker_threads)
    ours.pop("state_dict")
    sk = _sklearn_mlp(cfg.model.mlp.hidden, mlp_epochs, t.batch_size, 0.001, train, test, t.seed)
    summary["cases"]["mlp_fashion_mnist"] = {"dlpipe": ours, "sklearn_MLPClassifier": sk, "hidden": cfg.model.mlp.hidden,
                                             "goal": "dlpipe test_accuracy >= sklearn's"}
    _say(f"MLP: dlpipe {ours['test_accuracy']:.4f} in {ours['train_wall_s']:.0f} s; scikit-learn {sk['test_accuracy']:.4f} "
         f"in {sk['train_wall_s']:.0f} s")
    del train

    # 3. MLP on UCI Adult vs Spark MLlib (the table pipeline's Adult tables)
    summary["cases"]["mlp_adult"] = adult_case(spark, cfg, adult_conf, backend, workers, per_worker_threads)

    # 4. Fine-tuning: pretrained on five classes, 1% of the labels of the other five
    summary["cases"]["finetune_fashion_mnist"] = finetune_case(
        spark, net, base_fit, files, backend, workers, per_worker_threads, pretrain_epochs, finetune_epochs, finetune_fraction)
    return summary


def finetune_case(spark, net, fit, files, backend, workers, threads, pretrain_epochs, finetune_epochs,
                  fraction: float = 0.01) -> dict:
    """CNN trained on classes 0-4; its features, with a new head, fine-tuned on 1% of the training
    labels of classes 5-9, against the same CNN trained from scratch on that 1%."""
    first = dc.replace(net, num_outputs=len(FASHION_FIRST))
    second = dc.replace(net, num_outputs=len(FASHION_SECOND))
    pre = _run(spark, first, dc.replace(fit, epochs=pretrain_epochs), files["train"], files["test"], backend, workers,
               threads, labels=FASHION_FIRST)
    state = {k: v for k, v in pre.pop("state_dict").items() if not k.startswith("head.")}
    small = dc.replace(fit, epochs=finetune_epochs, batch_size=16, lr_schedule="cosine")
    runs = {}
    for name, extra in (("from_scratch", {}), ("fine_tuned", {"init_state": state}),
                        ("fine_tuned_frozen_features", {"init_state": state, "fit": dc.replace(small, freeze="features")})):
        run_fit = extra.pop("fit", small)
        runs[name] = _run(spark, second, run_fit, files["train"], files["test"], "local", 1, threads * workers,
                          labels=FASHION_SECOND, label_fraction=fraction, **extra)
        runs[name].pop("state_dict")
        _say(f"fine-tuning, {name}: test accuracy {runs[name]['test_accuracy']:.4f} on classes 5-9 "
             f"({runs[name]['train_rows']} labelled rows)")
    return {"pretrained_on_classes_0_4": pre, "label_fraction": fraction, **runs,
            "goal": "fine_tuned test_accuracy > from_scratch"}


def adult_case(spark, cfg: Config, conf: str, backend: str, workers: int, threads: int) -> dict:
    from dlpipe.config import load_config

    if not os.path.isfile(conf):
        return {"status": f"not wired: {conf} is missing"}
    adult = load_config(conf, [f"paths.lake={cfg.paths.lake}", f"spark.master={cfg.spark.master}"])
    tables = {}
    for split in ("train", "test"):
        uri = adult.table_uri(split)
        version = lake.latest_version(uri)
        if version is None:
            return {"status": f"not wired: no Delta table at {uri} (run `dlpipe prepare --conf {conf}` first)"}
        tables[split] = (uri, version)
    return _adult(spark, adult, tables, backend, workers, threads)


def _adult(spark, cfg: Config, tables: dict, backend: str, workers: int, threads: int) -> dict:
    from pyspark.ml.classification import LogisticRegression, MultilayerPerceptronClassifier
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    train_files = lake.table_files(*tables["train"])
    test_files = lake.table_files(*tables["test"])
    column, shape = modeling.input_of(spark, TableRef(*tables["test"]), cfg.data)
    net = modeling.net_for(cfg.model, cfg.data.name, column, shape, 2)
    t = cfg.train
    fit = TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, lr_schedule=t.lr_schedule, seed=t.seed,
                      checkpoint_every=0)
    ours = _run(spark, net, fit, train_files, test_files, backend, workers, threads)
    model = build(net)
    model.load_state_dict(ours.pop("state_dict"))
    x, y = arrays(test_files, shape)
    with torch.no_grad():
        p = torch.softmax(model.eval()(torch.from_numpy(x)), 1)[:, 1].numpy()
    ours["roc_auc"] = binary_auc(y, p)
    ours["test_accuracy"] = float(((p >= 0.5) == (y == 1)).mean())
    result = {"table_train": "%s@%s" % tables["train"], "table_test": "%s@%s" % tables["test"], "features": shape[0],
              "dlpipe_mlp": ours, "hidden": net.params.hidden}

    def vectors(ref):
        return lake.read_table(spark, *ref).select(F.col("label").cast("double"),
                                                   array_to_vector("features").alias("features")).cache()

    train_df, test_df = vectors(tables["train"]), vectors(tables["test"])
    train_df.count(), test_df.count()
    auc = BinaryClassificationEvaluator(rawPredictionCol="probability", labelCol="label", metricName="areaUnderROC")
    for name, estimator in (
        ("spark_MultilayerPerceptronClassifier", MultilayerPerceptronClassifier(
            layers=[shape[0], *net.params.hidden, 2], maxIter=200, seed=t.seed)),
        ("spark_LogisticRegression", LogisticRegression(maxIter=100)),
    ):
        started = time.perf_counter()
        fitted = estimator.fit(train_df)
        seconds = time.perf_counter() - started
        pred = fitted.transform(test_df)
        accuracy = pred.agg(F.avg((F.col("prediction") == F.col("label")).cast("double"))).first()[0]
        result[name] = {"test_accuracy": float(accuracy), "roc_auc": float(auc.evaluate(pred)), "train_wall_s": seconds}
        _say(f"Adult {name}: accuracy {accuracy:.4f}, ROC AUC {result[name]['roc_auc']:.4f}, {seconds:.0f} s")
    _say(f"Adult dlpipe MLP: accuracy {ours['test_accuracy']:.4f}, ROC AUC {ours['roc_auc']:.4f}, {ours['train_wall_s']:.0f} s")
    train_df.unpersist(), test_df.unpersist()
    return result
