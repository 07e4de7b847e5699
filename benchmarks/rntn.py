"""`dlpipe bench models --family embeddings`, case rntn: sentiment composed up parse trees on the
generated phrases (conf/phrases_rntn.yaml, dlpipe/phrases.py). dlpipe's RNTN, trained through its
launcher, against the plain recursive net (tensor: false, through the same launcher), a bag of
words (scikit-learn CountVectorizer + LogisticRegression) and the recurrent family's LSTM over the
leaves in order (dl.train.fit in-process). All read the same tables and are scored on the test
split's root labels: every row, the negated rows and the held-out compositions (negations of
adjectives never negated in training). The nets get the same budget: dimension (RNTN and plain
recursive net), epochs, batch, learning rate, schedule and threads."""

from __future__ import annotations

import dataclasses as dc
import time
from collections import Counter

import numpy as np
import torch

from benchmarks.common import dlpipe_run, say
from dl.models import Net, build
from dl.models.rnn import RNNConfig
from dl.train import SingleProcess, TrainConfig, fit
from dlpipe import lake, modeling, phrases
from dlpipe.config import Config
from dlpipe.launchers import TrainTask
from dlpipe.refs import TableRef


def rntn_case(spark, c: Config, t: TrainConfig, threads: int) -> dict:
    tables = {s: (uri, lake.latest_version(uri)) for s, uri in c.model_tables().items()}
    if any(v is None for _, v in tables.values()) or lake.latest_version(c.table_uri("vocab")) is None:
        return {"status": f"not wired: no {c.data.name} tables under {c.paths.lake} (run `dlpipe land` and "
                          f"`dlpipe prepare` with --conf conf/phrases_rntn.yaml)"}
    refs = {s: TableRef(*ref) for s, ref in tables.items()}
    setup = modeling.sequence_setup(spark, c.model, refs, c.data)
    column, shape = modeling.input_of(spark, refs["test"], c.data)
    net = modeling.net_for(c.model, c.data.name, column, shape, len(setup["classes"]), setup)
    read = {s: lake.read_columns(*tables[s], ["label", "tokens", "nodes"]).to_pydict() for s in ("train", "test")}
    tokens = {s: read[s]["tokens"] for s in read}
    y = {s: np.asarray(read[s]["label"], np.int64) for s in read}
    x_test = np.asarray(read["test"]["nodes"], np.float32)
    negated = np.array([phrases.negated(w) for w in tokens["test"]])
    held_out = np.array([phrases.held_out_composition(w) for w in tokens["test"]])

    def accuracy(pred, mask=None):
        mask = np.ones(len(pred), bool) if mask is None else mask
        return float((pred[mask] == y["test"][mask]).mean()) if mask.any() else None

    workers = 1 if t.backend == "local" else t.num_workers
    test_files = lake.table_files(*tables["test"])
    out: dict = {"test_rows": len(y["test"]), "negated_rows": int(negated.sum()), "held_out_rows": int(held_out.sum()),
                 "chance_negated": Counter(y["test"][negated].tolist()).most_common(1)[0][1] / max(int(negated.sum()), 1)}
    world_size = 1
    # key names: the RNTN's figures are the case's headline ones
    for name, tensor, keys in (("dlpipe", True, ("dlpipe_acc", "negation_acc", "held_out_acc")),
                               ("recursive", False, ("recursive_acc", "recursive_negation_acc", "recursive_held_out_acc"))):
        recursive = dc.replace(net, params=dc.replace(net.params, tensor=tensor))
        task = TrainTask(net=recursive, train=t, train_files=lake.table_files(*tables["train"]), val_files=test_files,
                         threads=max(1, threads // workers))
        r = dlpipe_run(spark, task, t.backend, t.num_workers)
        world_size = r["world_size"]
        torch.set_num_threads(threads)
        model = build(recursive)
        model.load_state_dict(r["state_dict"])
        pred = _predict(model, x_test)
        out |= dict(zip(keys, (accuracy(pred), accuracy(pred, negated), accuracy(pred, held_out))))
        out[f"{name}_s"] = r["train_wall_s"]
        say(f"rntn: {name} ({'tensor' if tensor else 'plain recursive net'}) root accuracy {out[keys[0]]:.4f}, negated "
            f"{out[keys[1]]:.4f}, {r['train_wall_s']:.0f} s ({t.backend}, {r['world_size']} worker(s))")

    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    bag = CountVectorizer(analyzer=lambda words: words)
    clf = LogisticRegression(max_iter=1000).fit(bag.fit_transform(tokens["train"]), y["train"])
    out["bow_s"] = time.perf_counter() - started
    pred = clf.predict(bag.transform(tokens["test"]))
    out |= {"bow_acc": accuracy(pred), "bow_negation_acc": accuracy(pred, negated),
            "bow_held_out_acc": accuracy(pred, held_out)}
    say(f"rntn: bag of words root accuracy {out['bow_acc']:.4f}, negated {out['bow_negation_acc']:.4f}, {out['bow_s']:.0f} s")

    # the LSTM reads the leaves left to right: ids of the same vocabulary, <unk> 1, right-padded with <pad> 0
    ids = {w: i for i, w in enumerate(setup["text"]["vocab"])}
    width = max(len(w) for s in tokens for w in tokens[s])
    x = {s: np.array([[ids.get(w, 1) for w in words] + [0] * (width - len(words)) for words in tokens[s]], np.int64)
         for s in tokens}
    lstm = Net(name="rnn", params=RNNConfig(cell="lstm", layers=1, hidden=64, embedding=64, bidirectional=False,
                                            vocab_size=len(ids)),
               input_shape=(width,), num_outputs=len(setup["classes"]), task="classification")
    torch.manual_seed(t.seed)
    model = build(lstm)
    started = time.perf_counter()
    fit(model, (x["train"], y["train"]), (x["test"], y["test"]), t, SingleProcess(), log=lambda _: None)
    out["lstm_s"] = time.perf_counter() - started
    pred = _predict(model, x["test"])
    out |= {"lstm_acc": accuracy(pred), "lstm_negation_acc": accuracy(pred, negated),
            "lstm_held_out_acc": accuracy(pred, held_out)}
    say(f"rntn: LSTM root accuracy {out['lstm_acc']:.4f}, negated {out['lstm_negation_acc']:.4f}, {out['lstm_s']:.0f} s")

    out["setup"] = {"dim": net.params.dim, "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr,
                    "lr_schedule": t.lr_schedule, "backend": t.backend, "world_size": world_size, "threads": threads,
                    "lstm": {"hidden": 64, "embedding": 64, "layers": 1}}
    out["goal"] = "negation_acc >= 0.95 while bow_negation_acc stays near chance"
    out["goal_met"] = bool(out["negation_acc"] >= 0.95 and out["bow_negation_acc"] <= out["chance_negated"] + 0.1)
    return out


@torch.no_grad()
def _predict(model, x: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    return torch.cat([model(torch.from_numpy(x[i:i + batch])).argmax(1) for i in range(0, len(x), batch)]).numpy()
