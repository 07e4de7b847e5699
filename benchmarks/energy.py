"""`dlpipe bench models --family energy`: RBMs, deep belief nets and collaborative filtering against
well-known baselines, in one run on the same Delta tables.

- cf: test RMSE on the MovieLens 100k split prepare wrote (<name>_vectors_*, the same held-out
  ratings for all; the item-based models read them by item, <name>_item_vectors_*): dlpipe's
  item-based ratings RBM and AutoRec (their confs' hyperparameters and epochs), the user-based
  RBM (the 2007 paper's model) and AutoRec as peer points, against Spark MLlib ALS tuned over a grid of rank x regParam on the validation split. ALS cannot
  score a user or item it never saw: those test ratings get the mean train rating (the RBM and
  AutoRec score every test rating too).
- dbn: 10% of Fashion-MNIST's training labels. The DBN is pretrained layer by layer on every
  training image (no labels), then fine-tuned on the 10%; against the same sigmoid MLP trained
  from scratch on the 10% with the same optimizer, epochs and batch.
- rbm_features: logistic regression (scikit-learn, the same settings) on the 10% labels over the
  hidden probabilities of dlpipe's RBM and of scikit-learn's BernoulliRBM, both with the same
  hidden units, epochs, batch and learning rate, trained on every training image."""

from __future__ import annotations

import dataclasses as dc
import math
import time

import numpy as np
import torch

from benchmarks.common import arrays, dlpipe_run, latest_tables, say
from dl.models import Net, build
from dl.models.dbn import DBNConfig
from dl.models.rbm import RBMConfig
from dl.train import TrainConfig
from dlpipe import lake, modeling
from dlpipe.config import Config, load_config
from dlpipe.launchers import TrainTask

LABEL_FRACTION = 0.1
# the user-based AutoRec, a peer point beside the item-based one of conf/movielens_autorec.yaml: the
# settings that did best for it on the val split (lr 0.001, batch 16 per worker, weight decay 0.003)
U_AUTOREC = ["model.autorec.based=user", "train.lr=0.001", "train.batch_size=16", "train.weight_decay=0.003"]
# the paper's user-based ratings RBM, a peer point beside the item-based one of conf/movielens_rbm.yaml (same settings)
U_RBM = ["model.rbm_cf.based=user"]


def run(spark, cfg: Config, rbm_conf: str = "conf/movielens_rbm.yaml", autorec_conf: str = "conf/movielens_autorec.yaml",
        hidden: int = 256, rbm_epochs: int = 10, dbn_layers: tuple[int, ...] = (500, 200), pretrain_epochs: int = 2,
        finetune_epochs: int = 30, cf_epochs: int = 0) -> dict:
    """cf_epochs: 0 = each recommender conf's train.epochs (the others: a smaller run for a smoke test)."""
    t = cfg.train
    backend, workers = t.backend, t.num_workers
    threads = max(1, torch.get_num_threads())
    per_worker = max(1, threads // (1 if backend == "local" else workers))
    summary: dict = {"step": "bench models", "family": "energy", "backend": backend, "workers": workers,
                     "threads": threads, "cases": {}}
    summary["cases"]["cf"] = cf_case(spark, cfg, rbm_conf, autorec_conf, backend, workers, per_worker, cf_epochs)
    tables = latest_tables(cfg, hint="run `dlpipe land-demo-data` and `dlpipe prepare` first")
    files = {split: lake.table_files(*ref) for split, ref in tables.items()}
    summary["tables"] = {split: "%s@%s" % ref for split, ref in tables.items()}
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    train, test = arrays(files["train"], shape), arrays(files["test"], shape)
    labelled = _labelled(files["train"], shape)
    summary["label_fraction"] = LABEL_FRACTION
    summary["cases"]["dbn"] = dbn_case(spark, files, shape, labelled, test, backend, workers, per_worker, dbn_layers,
                                       pretrain_epochs, finetune_epochs, t)
    summary["cases"]["rbm_features"] = rbm_features_case(spark, files, shape, train, labelled, test, backend, workers,
                                                         per_worker, hidden, rbm_epochs, t.seed)
    return summary


def _labelled(train_files: list[str], shape) -> tuple[np.ndarray, np.ndarray]:
    """The 10% of training rows the trainer keeps for data.label_fraction (the same stable hash of the key)."""
    return arrays(train_files, shape, fraction=LABEL_FRACTION)


# ---------------------------------------------------------------- collaborative filtering


def cf_case(spark, cfg: Config, rbm_conf: str, autorec_conf: str, backend: str, workers: int, threads: int,
            epochs: int = 0, als_grid: dict | None = None) -> dict:
    """epochs: 0 = each conf's train.epochs; als_grid: als()'s ranks / regs / iterations (None: its grid)."""
    out: dict = {}
    for key, conf, overrides in (("rbm", rbm_conf, []), ("u_rbm", rbm_conf, U_RBM), ("autorec", autorec_conf, []),
                                 ("u_autorec", autorec_conf, U_AUTOREC)):
        c = load_config(conf, [f"paths.lake={cfg.paths.lake}", *overrides])
        tables = {s: (uri, lake.latest_version(uri)) for s, uri in c.model_tables().items()}
        if tables["train"][0].endswith("item_vectors_train"):  # an item-based model: the test split by item too
            uri = c.table_uri("item_vectors_test")
            tables["test"] = (uri, lake.latest_version(uri))
        if any(v is None for _, v in tables.values()):
            return {"status": f"not wired: no MovieLens tables under {cfg.paths.lake} (run `dlpipe land` and "
                              f"`dlpipe prepare` with --conf conf/movielens.yaml)"}
        model = modeling.with_rating_range(c.model, c.data)
        width = len(lake.read_columns(tables["train"][0], tables["train"][1], ["ratings"]).column(0)[0])
        net = Net(name=model.name, params=getattr(model, model.name), input_shape=(width,), num_outputs=1,
                  task="recommendation")
        fit = dc.replace(c.train, checkpoint_every=0, tables={}, epochs=epochs or c.train.epochs)
        task = TrainTask(net=net, train=fit, train_files=lake.table_files(*tables["train"]),
                         val_files=lake.table_files(*tables["test"]), threads=threads)
        r = dlpipe_run(spark, task, backend, workers)  # its val figures are the test table's
        out[f"{key}_rmse"], out[f"{key}_s"] = r["test_accuracy"], r["train_wall_s"]
        out[f"{key}_setup"] = {"model": dc.asdict(net.params), "epochs": fit.epochs, "batch_size": fit.batch_size,
                               "optimizer": fit.optimizer, "lr": fit.lr, "weight_decay": fit.weight_decay}
        say(f"cf: {key} test RMSE {r['test_accuracy']:.4f} in {r['train_wall_s']:.0f} s")
        ratings = {s: c.table_uri(s) for s in ("train", "val", "test")}
    out |= als(spark, ratings, **(als_grid or {}))
    best = min(out["rbm_rmse"], out["autorec_rmse"])
    out["goal"] = "rbm_rmse and autorec_rmse < als_rmse; the better <= 0.91"
    out["goal_met"] = bool(out["rbm_rmse"] < out["als_rmse"] and out["autorec_rmse"] < out["als_rmse"] and best <= 0.91)
    return out


def als(spark, uris: dict[str, str], ranks=(10, 20, 50), regs=(0.05, 0.1, 0.2), iterations: int = 15) -> dict:
    """Spark MLlib ALS on the (user, item, rating) tables, the grid scored on val, the best on test."""
    import tempfile

    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    # ALS's lineage grows with every iteration; without a checkpoint directory (checkpointInterval 10)
    # deep grids overflow the executor's stack (measured: StackOverflowError at maxIter 15)
    spark.sparkContext.setCheckpointDir(tempfile.mkdtemp(prefix="dlpipe-als-"))
    frames = {}
    for split, uri in uris.items():
        df = lake.read_table(spark, uri, lake.latest_version(uri))
        frames[split] = df.select(F.col("user").cast("int").alias("user"), F.col("item").cast("int").alias("item"),
                                  F.col("rating").cast("float").alias("rating")).cache()
    mean = frames["train"].agg(F.avg("rating")).first()[0]

    def rmse(model, df) -> float:
        scored = model.transform(df).withColumn("prediction", F.coalesce(F.nanvl("prediction", F.lit(None)), F.lit(mean)))
        return math.sqrt(scored.agg(F.avg((F.col("prediction") - F.col("rating")) ** 2)).first()[0])

    started, grid = time.perf_counter(), []
    for rank in ranks:
        for reg in regs:
            model = ALS(rank=rank, regParam=reg, maxIter=iterations, userCol="user", itemCol="item", ratingCol="rating",
                        coldStartStrategy="nan", seed=42).fit(frames["train"])
            grid.append({"rank": rank, "regParam": reg, "val_rmse": rmse(model, frames["val"]), "model": model})
    best = min(grid, key=lambda g: g["val_rmse"])
    test = rmse(best["model"], frames["test"])
    seconds = time.perf_counter() - started
    for frame in frames.values():
        frame.unpersist()
    say(f"cf: ALS rank {best['rank']} regParam {best['regParam']} test RMSE {test:.4f} (grid of {len(grid)} in {seconds:.0f} s)")
    return {"als_rmse": test, "als_s": seconds, "als_best": {"rank": best["rank"], "regParam": best["regParam"],
                                                             "maxIter": iterations},
            "als_grid": [{k: v for k, v in g.items() if k != "model"} for g in grid]}


# ---------------------------------------------------------------- deep belief net with 10% of the labels


def dbn_case(spark, files, shape, labelled, test, backend, workers, threads, layers, pretrain_epochs, finetune_epochs,
             t) -> dict:
    net = Net(name="dbn", params=DBNConfig(layers=list(layers)), input_shape=shape, num_outputs=10, task="classification")
    # 1. every training image, no labels: the greedy pretraining alone (no fine-tuning epoch)
    pre_fit = TrainConfig(epochs=0, pretrain="greedy", pretrain_epochs=pretrain_epochs, batch_size=t.batch_size,
                          lr=t.lr, lr_schedule="constant", seed=t.seed, checkpoint_every=0)
    pre = dlpipe_run(spark, TrainTask(net=net, train=pre_fit, train_files=files["train"], val_files=files["test"],
                                      threads=threads), backend, workers)
    state = {k: v for k, v in pre["state_dict"].items() if not k.startswith("head.")}
    say(f"dbn: pretrained {len(layers)} layers x {pretrain_epochs} epochs on {pre['train_rows']} images in "
        f"{pre['train_wall_s']:.0f} s")
    # 2. the 10%: fine-tuned from the pretrained stack vs the same net from scratch, same schedule
    fine = TrainConfig(epochs=finetune_epochs, batch_size=32, lr=t.lr, lr_schedule="cosine", seed=t.seed, checkpoint_every=0)
    runs = {}
    for name, extra in (("dlpipe", {"init_state": state}), ("scratch", {})):
        task = TrainTask(net=net, train=fine, train_files=files["train"], val_files=files["test"], threads=threads * workers,
                         label_fraction=LABEL_FRACTION, **extra)
        runs[name] = dlpipe_run(spark, task, "local", 1)
        say(f"dbn: {name} test accuracy {runs[name]['test_accuracy']:.4f} in {runs[name]['train_wall_s']:.0f} s")
    return {"dlpipe_acc": runs["dlpipe"]["test_accuracy"], "scratch_acc": runs["scratch"]["test_accuracy"],
            "pretrain_s": pre["train_wall_s"], "dlpipe_finetune_s": runs["dlpipe"]["train_wall_s"],
            "scratch_s": runs["scratch"]["train_wall_s"], "labelled_rows": runs["dlpipe"]["train_rows"],
            "layers": list(layers), "pretrain_epochs": pretrain_epochs, "finetune_epochs": finetune_epochs,
            "goal": "dlpipe_acc > scratch_acc", "goal_met": runs["dlpipe"]["test_accuracy"] > runs["scratch"]["test_accuracy"]}


# ---------------------------------------------------------------- RBM features vs scikit-learn's BernoulliRBM


def rbm_features_case(spark, files, shape, train, labelled, test, backend, workers, threads, hidden, epochs, seed) -> dict:
    from sklearn.neural_network import BernoulliRBM

    lr, batch = 0.05, 64
    net = Net(name="rbm", params=RBMConfig(hidden=hidden), input_shape=shape, num_outputs=1, task="reconstruction")
    fit = TrainConfig(epochs=epochs, batch_size=batch, optimizer="sgd", lr=lr, lr_schedule="constant", seed=seed,
                      checkpoint_every=0)
    ours = dlpipe_run(spark, TrainTask(net=net, train=fit, train_files=files["train"], val_files=files["test"],
                                       threads=threads), backend, workers)
    model = build(net)
    model.load_state_dict(ours["state_dict"])
    model.eval()

    def features(x):
        with torch.no_grad():
            return model.features(torch.from_numpy(x)).numpy()

    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    sk = BernoulliRBM(n_components=hidden, learning_rate=lr, batch_size=batch, n_iter=epochs, random_state=seed)
    started = time.perf_counter()
    sk.fit(flat(train[0]))
    sk_s = time.perf_counter() - started
    dlpipe_acc = _logistic(features(labelled[0]), labelled[1], features(test[0]), test[1], seed)
    sklearn_acc = _logistic(sk.transform(flat(labelled[0])), labelled[1], sk.transform(flat(test[0])), test[1], seed)
    say(f"rbm features: dlpipe {dlpipe_acc:.4f} ({ours['train_wall_s']:.0f} s), scikit-learn BernoulliRBM "
        f"{sklearn_acc:.4f} ({sk_s:.0f} s)")
    return {"dlpipe_acc": dlpipe_acc, "sklearn_acc": sklearn_acc, "dlpipe_s": ours["train_wall_s"], "sklearn_s": sk_s,
            "hidden": hidden, "epochs": epochs, "batch_size": batch, "lr": lr,
            "dlpipe_val_mse": ours["history"][-1]["val_mse"], "classifier": "LogisticRegression(max_iter=1000) on the 10%"}


def _logistic(x, y, test_x, test_y, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(x, y)
    return float((clf.predict(test_x) == test_y).mean())

