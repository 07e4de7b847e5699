"""`dlpipe bench models --family autoencoders`: dlpipe's autoencoders and batch SOM, trained by the
one distributed loop on the prepared Fashion-MNIST tables, against well-known baselines on the
same train split, every figure on the test split:

- deep_ae: test reconstruction MSE of the deep autoencoder (30-d code) vs PCA with 30 components
  (scikit-learn); goal ratio <= 0.5.
- denoising: the denoising and the plain autoencoder rebuilding the clean test images from noisy
  ones (Gaussian noise of the denoising kind's std).
- sparse, contractive: a linear probe (scikit-learn's logistic regression) on each one's codes
  against the same probe on the plain autoencoder's codes.
- som: the map vs MiniSom (same map, epochs, Gaussian neighbourhood and linear sigma schedule;
  MiniSom trains online, one sample at a time) and vs Spark MLlib k-means with as many centres and
  at most as many iterations as the map's epochs: QE, TE, wall time."""

from __future__ import annotations

import dataclasses as dc
import time

import numpy as np
import torch

from benchmarks.common import arrays, dlpipe_run, latest_tables, say
from dl.models import Net, build
from dl.train import TrainConfig
from dlpipe import lake
from dlpipe.config import Config
from dlpipe.launchers import TrainTask

KINDS = ("deep", "denoising", "sparse", "contractive")


def run(spark, cfg: Config, *, som_epochs: int = 10, som_side: int = 20, code: int = 30, probe_rows: int = 10_000) -> dict:
    """The autoencoders train for the conf's train.epochs at its train.lr (cosine schedule)."""
    t = cfg.train
    ae_epochs = t.epochs
    backend, workers = t.backend, t.num_workers
    processes = 1 if backend == "local" else workers
    threads = max(1, torch.get_num_threads() // processes)
    tables = latest_tables(cfg, hint="run `dlpipe land-demo-data` and `dlpipe prepare` first")
    files = {split: lake.table_files(*ref) for split, ref in tables.items()}
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    train, test = arrays(files["train"], shape), arrays(files["test"], shape)
    summary: dict = {"step": "bench models", "family": "autoencoders", "backend": backend, "workers": workers,
                     "tables": {split: "%s@%s" % ref for split, ref in tables.items()}, "cases": {}}
    fit = TrainConfig(epochs=ae_epochs, batch_size=t.batch_size, lr=t.lr, lr_schedule="cosine", seed=t.seed,
                      checkpoint_every=0, pretrain=t.pretrain, pretrain_epochs=t.pretrain_epochs)  # --set train.pretrain=greedy
    trained = {}
    for kind in KINDS:
        net = Net(name="autoencoder", params=dc.replace(cfg.model.autoencoder, kind=kind, code=code), input_shape=shape,
                  num_outputs=1, task="reconstruction")
        result = dlpipe_run(spark, TrainTask(net=net, train=fit, train_files=files["train"], val_files=files["test"],
                                             threads=threads), backend, workers)
        model = build(net)
        model.load_state_dict(result["state_dict"])
        trained[kind] = (model.eval(), {"test_mse": result["history"][-1]["val_mse"], "train_wall_s": result["train_wall_s"],
                                        "epochs": ae_epochs, "pretrain": fit.pretrain, "world_size": result["world_size"]})
        say(f"{kind} autoencoder: test MSE {trained[kind][1]['test_mse']:.5f} in {result['train_wall_s']:.0f} s")
    cases = summary["cases"]
    cases["deep_ae"] = deep_vs_pca(trained["deep"], train[0], test[0], code, t.seed)
    cases["denoising"] = denoising_case(trained, test[0], t.seed)
    for kind in ("sparse", "contractive"):
        cases[kind] = probe_case(trained, kind, train, test, probe_rows, t.seed)
    som_fit = dc.replace(fit, epochs=som_epochs, pretrain="none")
    cases["som"] = som_case(spark, files, tables["train"], train[0], test[0], backend, workers, threads, som_side, som_fit)
    return summary


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)


@torch.no_grad()
def _rebuild(model, x: np.ndarray, batch: int = 2048) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


@torch.no_grad()
def _codes(model, x: np.ndarray, batch: int = 2048) -> np.ndarray:
    return np.concatenate([model.features(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def deep_vs_pca(deep, x_train: np.ndarray, x_test: np.ndarray, code: int, seed: int) -> dict:
    from sklearn.decomposition import PCA

    _, figures = deep
    started = time.perf_counter()
    pca = PCA(n_components=code, random_state=seed).fit(_flat(x_train))
    seconds = time.perf_counter() - started
    rebuilt = pca.inverse_transform(pca.transform(_flat(x_test)))
    pca_mse = float(np.mean((rebuilt - _flat(x_test)) ** 2))
    say(f"deep autoencoder vs PCA-{code}: test MSE {figures['test_mse']:.5f} vs {pca_mse:.5f}")
    return {"dlpipe_mse": figures["test_mse"], "pca_mse": pca_mse, "ratio": figures["test_mse"] / pca_mse, "code": code,
            "dlpipe": figures, "pca_fit_s": seconds, "goal": "ratio <= 0.5"}


def denoising_case(trained: dict, x_test: np.ndarray, seed: int) -> dict:
    model = trained["denoising"][0]
    noisy = (x_test + model.cfg.noise * np.random.default_rng(seed).normal(size=x_test.shape)).astype(np.float32)
    mse = {kind: float(np.mean((_rebuild(trained[kind][0], noisy) - x_test) ** 2)) for kind in ("denoising", "deep")}
    say(f"noisy test images (std {model.cfg.noise}): denoising MSE {mse['denoising']:.5f}, plain {mse['deep']:.5f}")
    return {"noise": model.cfg.noise, "denoising_mse_on_noisy": mse["denoising"], "deep_mse_on_noisy": mse["deep"],
            "goal": "denoising_mse_on_noisy < deep_mse_on_noisy"}


def probe_case(trained: dict, kind: str, train, test, rows: int, seed: int) -> dict:
    """Test accuracy of a logistic regression on the codes of `rows` training images drawn at
    random (the table is stored class by class: its first rows hold two classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    pick = np.random.default_rng(seed).permutation(len(train[0]))[:rows]
    x, y = train[0][pick], train[1][pick]

    def probe(model) -> float:
        codes = _codes(model, x)
        scale = StandardScaler().fit(codes)
        clf = LogisticRegression(max_iter=1000, random_state=seed).fit(scale.transform(codes), y)
        return float(clf.score(scale.transform(_codes(model, test[0])), test[1]))

    ours, plain = probe(trained[kind][0]), probe(trained["deep"][0])
    say(f"linear probe on the codes: {kind} {ours:.4f}, plain {plain:.4f}")
    return {"probe_accuracy": ours, "deep_probe_accuracy": plain, "probe_rows": len(pick),
            "test_mse": trained[kind][1]["test_mse"], "goal": "probe_accuracy > deep_probe_accuracy"}


def som_case(spark, files: dict, train_table: tuple[str, int], x_train: np.ndarray, x_test: np.ndarray, backend: str, workers: int, threads: int,
             side: int, fit: TrainConfig) -> dict:
    from dl.models.som import SOMConfig

    epochs, seed = fit.epochs, fit.seed
    sigma = side / 2
    # MiniSom's linear_decay_to_one at epoch t of E: sigma + t (1 - sigma) / E; dlpipe's reaches sigma_end at t = E - 1
    params = SOMConfig(rows=side, columns=side, topology="hexagonal", sigma=sigma,
                       sigma_end=sigma + (epochs - 1) * (1 - sigma) / epochs, rate=1.0, rate_end=1.0)
    net = Net(name="som", params=params, input_shape=x_train.shape[1:], num_outputs=1, task="clustering")
    result = dlpipe_run(spark, TrainTask(net=net, train=fit, train_files=files["train"], val_files=files["test"],
                                         threads=threads), backend, workers)
    som = build(net)
    som.load_state_dict(result["state_dict"])
    with torch.no_grad():
        _, qe, te = som.quality(torch.from_numpy(x_test))
    out = {"map": f"{side}x{side} hexagonal", "epochs": epochs, "sigma": [sigma, params.sigma_end],
           "dlpipe_qe": float(qe.mean()), "dlpipe_te": float(te.mean()), "dlpipe_s": result["train_wall_s"],
           "world_size": result["world_size"]}
    out |= _minisom(_flat(x_train), _flat(x_test), side, sigma, epochs, seed)
    out |= _kmeans(spark, train_table, _flat(x_test), side * side, epochs, seed)
    say(f"SOM {side}x{side}: QE dlpipe {out['dlpipe_qe']:.4f} / MiniSom {out['minisom_qe']:.4f} / k-means "
        f"{out['kmeans_qe']:.4f}; TE dlpipe {out['dlpipe_te']:.4f} / MiniSom {out['minisom_te']:.4f}; "
        f"{out['dlpipe_s']:.0f} s vs {out['minisom_s']:.0f} s")
    out["goal"] = "dlpipe_qe <= minisom_qe, dlpipe_te <= minisom_te, dlpipe_s < minisom_s"
    return out


def _minisom(x_train: np.ndarray, x_test: np.ndarray, side: int, sigma: float, epochs: int, seed: int) -> dict:
    try:
        from minisom import MiniSom
    except ImportError:
        raise RuntimeError("the SOM baseline needs MiniSom: pip install -e '.[bench]' (make setup does)") from None
    som = MiniSom(side, side, x_train.shape[1], sigma=sigma, learning_rate=0.5, neighborhood_function="gaussian",
                  topology="hexagonal", decay_function="linear_decay_to_zero", sigma_decay_function="linear_decay_to_one",
                  random_seed=seed)
    started = time.perf_counter()
    som.train(x_train, epochs, random_order=True, use_epochs=True)
    seconds = time.perf_counter() - started
    return {"minisom_qe": float(som.quantization_error(x_test)), "minisom_te": float(som.topographic_error(x_test)),
            "minisom_s": seconds, "minisom": "online training, learning rate 0.5 decaying linearly to 0"}


def _kmeans(spark, train_table: tuple[str, int], x_test: np.ndarray, k: int, epochs: int, seed: int) -> dict:
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector

    frame = lake.read_table(spark, *train_table).select(array_to_vector("pixels").alias("features")).cache()
    frame.count()
    started = time.perf_counter()
    model = KMeans(k=k, seed=seed, maxIter=epochs).fit(frame)  # as many passes over the rows as the map's epochs
    seconds = time.perf_counter() - started
    frame.unpersist()
    centres = torch.tensor(np.array(model.clusterCenters()), dtype=torch.float32)
    qe = torch.cdist(torch.from_numpy(x_test), centres).min(1).values.mean().item()
    return {"kmeans_qe": qe, "kmeans_k": k, "kmeans_s": seconds}
