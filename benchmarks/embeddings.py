"""`dlpipe bench models --family embeddings`: dlpipe's word2vec, trained through its launcher on the
prepared corpus (conf/gutenberg_word2vec.yaml: its model, epochs, batch and learning rate, the
configured backend and workers), against gensim's Word2Vec (the same dimensions, window, negatives,
subsampling, epochs and threads) and Spark MLlib's Word2Vec (skip-gram with hierarchical softmax:
no negatives, no subsampling; the same dimensions, window and epochs, one partition per thread).

All three read the same sentences: the train table's token ids mapped back to words, <unk> left
out, so all three see the vocabulary prepare fitted (min count applied once). Scored on the Google
analogy questions and WordSim353 over the words the three share (benchmarks.embeddings_baselines).

Case rntn (benchmarks/rntn.py, conf/phrases_rntn.yaml, the same backend and workers): the RNTN on
the generated sentiment phrases against the plain recursive net, a bag of words and an LSTM, by
root accuracy on the test trees, on negated phrases and on held-out compositions."""

from __future__ import annotations

import dataclasses as dc

import numpy as np
import torch

from benchmarks.common import dlpipe_run, say
from benchmarks.embeddings_baselines import analogy_accuracy, gensim_word2vec, mllib_word2vec, shared_vocab, similarity_spearman
from benchmarks.rntn import rntn_case
from dl.models import Net
from dl.models.word2vec_sgd import MIN_RATE
from dlpipe import lake, modeling
from dlpipe.config import Config, load_config
from dlpipe.launchers import TrainTask
from dlpipe.refs import TableRef


def run(spark, cfg: Config, conf: str = "conf/gutenberg_word2vec.yaml", epochs: int = 0) -> dict:
    c = load_config(conf, [f"paths.lake={cfg.paths.lake}"])
    t = dc.replace(c.train, backend=cfg.train.backend, num_workers=cfg.train.num_workers, checkpoint_every=0, tables={},
                   epochs=epochs or c.train.epochs)
    threads = max(1, torch.get_num_threads())
    summary: dict = {"step": "bench models", "family": "embeddings", "backend": t.backend, "workers": t.num_workers,
                     "threads": threads, "cases": {}}
    summary["cases"]["word2vec"] = word2vec_case(spark, c, t, threads)
    phrases = load_config("conf/phrases_rntn.yaml", [f"paths.lake={cfg.paths.lake}"])
    summary["cases"]["rntn"] = rntn_case(spark, phrases, dc.replace(
        phrases.train, backend=cfg.train.backend, num_workers=cfg.train.num_workers, checkpoint_every=0, tables={}), threads)
    return summary


def word2vec_case(spark, c: Config, t, threads: int) -> dict:
    tables = {s: (uri, lake.latest_version(uri)) for s, uri in c.model_tables().items()}
    vocab_uri = c.table_uri("vocab")
    if any(v is None for _, v in tables.values()) or lake.latest_version(vocab_uri) is None:
        return {"status": f"not wired: no {c.data.name} tables under {c.paths.lake} (run `dlpipe land` and "
                          f"`dlpipe prepare` with --conf conf/gutenberg_word2vec.yaml)"}
    setup = modeling.sequence_setup(spark, c.model, {s: TableRef(*ref) for s, ref in tables.items()}, c.data)
    vocab = setup["text"]["vocab"]  # by id, with the counts in setup["params"] as training gets them
    ids = lake.read_columns(*tables["train"], ["ids"]).column("ids").to_pylist()
    sentences = [[vocab[i] for i in row if i >= 2] for row in ids]
    sentences = [s for s in sentences if s]
    p = c.model.word2vec
    say(f"word2vec: {len(sentences)} sentences, {sum(map(len, sentences))} words, vocabulary {len(vocab) - 2}")

    net = Net(name="word2vec", params=setup["params"], input_shape=(c.data.text.max_length,), num_outputs=1,
              task="embedding")
    workers = 1 if t.backend == "local" else t.num_workers
    task = TrainTask(net=net, train=t, train_files=lake.table_files(*tables["train"]),
                     val_files=lake.table_files(*tables["val"]), threads=max(1, threads // workers))
    r = dlpipe_run(spark, task, t.backend, t.num_workers)
    models = {"dlpipe": {"words": vocab[2:], "vectors": r["state_dict"]["embed.weight"].numpy()[2:],
                         "seconds": r["train_wall_s"]}}
    say(f"word2vec: dlpipe {r['train_wall_s']:.0f} s ({t.backend}, {r['world_size']} worker(s))")
    # the same schedule as dlpipe's own SGD (update: pairs): the rate from train.lr down to lr * 1e-4
    alpha = t.lr if p.update == "pairs" else 0.025
    models["gensim"] = gensim_word2vec(sentences, dim=p.dim, window=p.window, negatives=p.negatives, epochs=t.epochs,
                                       min_count=1, sample=p.subsample, sg=p.architecture == "skipgram",
                                       threads=threads, seed=t.seed, alpha=alpha, min_alpha=alpha * MIN_RATE)
    say(f"word2vec: gensim {models['gensim']['seconds']:.0f} s")
    models["mllib"] = mllib_word2vec(spark, sentences, dim=p.dim, window=p.window, epochs=t.epochs, min_count=1,
                                     partitions=threads, seed=t.seed)
    say(f"word2vec: MLlib {models['mllib']['seconds']:.0f} s")
    shared = shared_vocab(*(m["words"] for m in models.values()))
    out: dict = {"sentences": len(sentences), "vocabulary": len(vocab) - 2, "shared_vocabulary": len(shared)}
    for name, m in models.items():
        analogies = analogy_accuracy(m["words"], m["vectors"], shared)
        similarity = similarity_spearman(m["words"], m["vectors"], shared)
        out |= {f"{name}_analogy": analogies["accuracy"], f"{name}_wordsim": similarity["spearman"],
                f"{name}_s": m["seconds"]}
        out["analogy_questions"], out["wordsim_pairs"] = analogies["questions"], similarity["pairs"]
        say(f"word2vec: {name} analogy {analogies['accuracy']:.4f} of {analogies['questions']}, "
            f"WordSim353 Spearman {similarity['spearman']:.4f} of {similarity['pairs']} pairs, {m['seconds']:.0f} s")
    out |= {"dlpipe_final_val_pair_accuracy": r["test_accuracy"], "dlpipe_startup_s": r["startup_s"],
            "dlpipe_samples_per_s": r["samples_per_sec"]}
    out["setup"] = {"model": {k: v for k, v in dc.asdict(p).items() if k not in ("counts", "vocab_size")},
                    "epochs": t.epochs, "batch_size": t.batch_size, "optimizer": t.optimizer, "lr": t.lr,
                    "sync": t.sync, "backend": t.backend, "world_size": r["world_size"], "gensim_threads": threads,
                    "gensim_alpha": alpha, "mllib_partitions": threads}
    out["wall_ratio_dlpipe_to_gensim"] = out["dlpipe_s"] / out["gensim_s"]
    out["goal"] = "dlpipe_analogy >= gensim_analogy and dlpipe_wordsim >= gensim_wordsim at dlpipe_s <= 2 x gensim_s"
    out["goal_met"] = bool(out["dlpipe_analogy"] >= out["gensim_analogy"] and out["dlpipe_wordsim"] >= out["gensim_wordsim"]
                           and out["dlpipe_s"] <= 2 * out["gensim_s"])
    return out
