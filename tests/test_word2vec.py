"""word2vec (dl/models/word2vec.py): the windows it cuts, its subsampling and noise distributions
against their formulas, skip-gram and CBOW learning which words go together, parameter averaging
with k = 1 equal to allreduce for the embedding tables; and (slow) a corpus through prepare ->
train -> evaluate -> `dlpipe words` -> `dlpipe embed` on a real Spark, Delta and MLflow, the
registered pyfunc loaded where dlpipe cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dl.models import Net, build
from dl.models.word2vec import Word2Vec, Word2VecConfig, keep_probability
from dl.train import SingleProcess, TrainConfig, fit
from dlpipe.errors import ConfigError
from tests.conftest import WITHOUT_DLPIPE, make_config, stage, with_run

TOPICS = (["sun", "moon", "star", "sky", "cloud", "rain"], ["bread", "milk", "cheese", "butter", "egg", "salt"])


def _corpus(rows=1500, length=8, seed=0):
    """Id rows of one topic each (ids 2..7 and 8..13), right-padded to 12 with 0."""
    rng = np.random.default_rng(seed)
    x = np.zeros((rows, 12), np.int32)
    for i in range(rows):
        base = 2 + 6 * (i % 2)
        x[i, :length] = rng.integers(base, base + 6, length)
    return x


def _model(**params) -> Word2Vec:
    counts = (0, 0) + (100,) * 12
    return Word2Vec(Word2VecConfig(**{"vocab_size": 14, "counts": counts, "dim": 16, "window": 2} | params))


def test_windows_pair_each_word_with_its_neighbours_after_dropping_padding_and_unknown_words():
    model = _model().eval()  # eval: every word kept, full windows
    centre, neighbours, mask = model.windows(torch.tensor([[2, 3, 1, 4, 5, 0, 0]]))
    pairs = {(int(c), int(n)) for c, row, keep in zip(centre[0], neighbours[0], mask[0]) for n, k in zip(row, keep) if k}
    words = [2, 3, 4, 5]  # <unk> (1) dropped before the windows are cut, so 3 and 4 become neighbours
    expected = {(words[i], words[j]) for i in range(4) for j in range(4) if i != j and abs(i - j) <= 2}
    assert pairs == expected and int(mask.sum()) == 10


def test_subsampling_and_noise_follow_word2vecs_formulas():
    counts = torch.tensor([0, 0, 9000, 900, 90, 10], dtype=torch.float64)
    f = counts / counts.sum()
    expected = ((f / 1e-3).sqrt() + 1) * 1e-3 / f
    assert torch.allclose(keep_probability(counts, 1e-3)[2:], expected[2:].clamp(max=1))
    model = Word2Vec(Word2VecConfig(vocab_size=6, counts=tuple(int(c) for c in counts), dim=4, subsample=1e-3))
    torch.manual_seed(0)
    drawn = torch.bincount(model.noise_words(200_000), minlength=6).double() / 200_000
    p = counts[2:] ** 0.75 / (counts[2:] ** 0.75).sum()
    assert drawn[:2].sum() == 0 and torch.allclose(drawn[2:], p, atol=0.005)  # never <pad> or <unk>
    model.train()
    centre = model.windows(torch.full((20_000, 3), 2))[0]  # the most frequent word, three times a row
    assert float((centre == 2).double().mean()) == pytest.approx(float(keep_probability(counts, 1e-3)[2]), abs=0.01)


def test_the_compiled_loops_draws_follow_the_same_distributions():
    from dl.models.word2vec_sgd import draw_kept, draw_noise

    counts = torch.tensor([0, 0, 9000, 900, 90, 10], dtype=torch.float64)
    model = Word2Vec(Word2VecConfig(vocab_size=6, counts=tuple(int(c) for c in counts), dim=4, subsample=1e-3))
    state, drawn = np.uint64(3), []
    for _ in range(200_000):
        word, state = draw_noise(state, model.noise_table.numpy())
        drawn.append(word)
    p = counts[2:] ** 0.75 / (counts[2:] ** 0.75).sum()
    share = np.bincount(drawn, minlength=6) / len(drawn)
    assert share[:2].sum() == 0 and np.allclose(share[2:], p.numpy(), atol=0.005)
    for word in (2, 3, 4):  # kept with probability 0.034, 0.116 and 0.444 by the formula
        keep, kept = float(model.keep[word]), 0
        for _ in range(20_000):
            stays, state = draw_kept(state, keep)
            kept += stays
        assert kept / 20_000 == pytest.approx(keep, abs=0.01) and keep < 0.5
    assert all(draw_kept(np.uint64(s), float(model.keep[5]))[0] for s in range(100))  # a rare word: always kept


@pytest.mark.parametrize("update", ["pairs", "batches"])
@pytest.mark.parametrize("architecture", ["skipgram", "cbow"])
def test_words_that_occur_together_end_nearest(architecture, update):
    torch.manual_seed(0)
    model = _model(architecture=architecture, subsample=0, update=update)
    x = _corpus()
    history = fit(model, (x, np.zeros(len(x))), (x[:64], np.zeros(64)), TrainConfig(
        epochs=3, batch_size=32, lr=0.025 if update == "pairs" else 0.01, checkpoint_every=0), task="embedding",
        log=lambda _: None)
    assert history[-1]["val_pair_accuracy"] > 0.7 and history[-1]["loss"] < history[0]["loss"]
    v = torch.nn.functional.normalize(model.vectors()[2:], dim=1)
    similarity = v @ v.t()
    same = similarity[:6, :6].fill_diagonal_(float("nan")).nanmean()
    across = similarity[:6, 6:].mean()
    assert same > across + 0.3, (same, across)
    nearest = similarity.fill_diagonal_(-2).argmax(1)
    assert ((nearest < 6) == (torch.arange(12) < 6)).all()  # every word's nearest is of its own topic


def test_the_pairs_update_is_word2vecs_sgd_step_on_each_pair():
    # one sentence of two words, window 1, no subsampling; the only noise word is word 2 itself, which
    # is skipped as noise for itself: the pairs are (input 3 -> output 2) and then (input 2 -> output 3,
    # noise 2), each one SGD step of -log s(u . v) (true) and -log s(-u . v) (noise) at the rate
    model = _model(window=1, subsample=0, dynamic_window=False, negatives=1, counts=(0, 0, 100) + (0,) * 11)
    with torch.no_grad():
        model.embed.weight.normal_(0, 0.3)
        model.context.weight.normal_(0, 0.3)
    v, u = model.embed.weight.detach().clone().double(), model.context.weight.detach().clone().double()
    lr = 0.1
    model.train_epoch(torch.tensor([[2, 3, 0]]), 1, 1, SingleProcess(), lr=lr, sync_rows=1, seed=0, shuffle=False)
    rate = lr  # the rate falls linearly over the run's words from lr: the first row's pairs take lr itself
    sig = torch.sigmoid
    g = rate * (1 - sig(v[3] @ u[2]))  # input 3, true output 2
    u2, v3 = u[2] + g * v[3], v[3] + g * u[2]
    g_true, g_noise = rate * (1 - sig(v[2] @ u[3])), -rate * sig(v[2] @ u2)  # input 2: true 3, noise 2
    u3, u2 = u[3] + g_true * v[2], u2 + g_noise * v[2]
    v2 = v[2] + g_true * u[3] + g_noise * (u[2] + g * v[3])
    new_v, new_u = model.embed.weight.detach().double(), model.context.weight.detach().double()
    for got, want in ((new_v[2], v2), (new_v[3], v3), (new_u[2], u2), (new_u[3], u3)):
        assert torch.allclose(got, want, atol=2e-3 * rate), (got, want)  # the table's sigmoid: 0.012 wide steps
    assert torch.equal(new_v[4:], v[4:].float()) and torch.equal(new_u[4:], u[4:].float())  # no other row moved


def test_the_reported_loss_is_the_mean_and_the_sum_gradient_moves_each_example_by_the_full_rate():
    x = torch.from_numpy(_corpus(rows=8))
    grads = {}
    for gradient in ("mean", "sum"):
        torch.manual_seed(0)  # the same start and the same noise words
        model = _model(subsample=0, gradient=gradient, update="batches").eval()
        loss, _, n = model.objective(x)
        loss.backward()
        grads[gradient] = (float(loss.detach()), model.context.weight.grad.clone(), n)  # input vectors' is 0 at the start
    assert grads["mean"][0] == pytest.approx(grads["sum"][0], rel=1e-5) and grads["sum"][1].abs().sum() > 0
    assert torch.allclose(grads["sum"][1], grads["mean"][1] * grads["mean"][2], atol=1e-5)


def test_config_refuses_what_the_pairs_update_cannot_do(tmp_path):
    base = ["model.name=word2vec", "model.task=embedding"]
    with pytest.raises(ConfigError, match="train.elastic.*model.word2vec.update: batches"):
        make_config(tmp_path, *base, "train.elastic=true", conf="conf/gutenberg_word2vec.yaml")
    with pytest.raises(ConfigError, match="train.use_gpu.*update: pairs trains on the CPU"):
        make_config(tmp_path, *base, "train.use_gpu=true", conf="conf/gutenberg_word2vec.yaml")
    make_config(tmp_path, *base, "train.elastic=true", "model.word2vec.update=batches", conf="conf/gutenberg_word2vec.yaml")
    with pytest.raises(ConfigError, match="train.elastic': model som trains whole epochs itself"):  # no update field
        make_config(tmp_path, "model.name=som", "model.task=clustering", "train.elastic=true")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="negatives: expected positive integers"):
        Word2VecConfig(negatives=0)
    with pytest.raises(ValueError, match="counts: expected one count per token id"):
        Word2VecConfig(vocab_size=5, counts=(1, 2))
    with pytest.raises(ValueError, match="vocab_size"):
        build(Net(name="word2vec", params=Word2VecConfig(), input_shape=(12,), num_outputs=1, task="embedding"))


@pytest.mark.slow
def test_parameter_averaging_every_step_equals_allreduce_for_the_embedding_tables(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dlpipe.launchers import TrainTask, launch

    files = {}
    for split, rows in (("train", 256), ("val", 32)):
        x = _corpus(rows, seed=len(split))
        files[split] = [str(tmp_path / f"{split}.parquet")]
        pq.write_table(pa.table({"ids": pa.array(list(x), pa.list_(pa.int32()))}), files[split][0])
    net = Net(name="word2vec", params=_model(update="batches").cfg, input_shape=(12,), num_outputs=1, task="embedding")
    base = dict(epochs=1, batch_size=16, lr=0.5, optimizer="sgd", seed=5, checkpoint_every=0)
    results = [launch(spark, TrainTask(net=net, train=TrainConfig(**base, **sync), train_files=files["train"],
                                       val_files=files["val"], threads=1), "horovod", 2)
               for sync in ({"sync": "allreduce"}, {"sync": "average", "average_every": 1})]
    for result in results:  # two real Horovod workers, not a fallback to one process
        assert (result["backend"], result["world_size"]) == ("horovod", 2)
    allreduce, averaged = (r["state_dict"] for r in results)
    assert allreduce["context.weight"].abs().sum() > 0  # it trained (the output vectors start at 0)
    for table in ("embed.weight", "context.weight"):
        assert torch.allclose(allreduce[table], averaged[table], atol=1e-6), table


@pytest.mark.slow
def test_two_horovod_workers_add_up_their_changes_to_the_tables(spark, tmp_path):
    """update: pairs: after each sync both tables are the start plus every worker's change since it, each
    worker's change being what its own SGD on its shard makes of the start (here one sync per epoch)."""
    import copy

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dl.train import _seed
    from dlpipe.launchers import TrainTask, launch
    from dlpipe.worker import load_shard

    files = {}
    for split, rows in (("train", 256), ("val", 32)):
        files[split] = [str(tmp_path / f"{split}.parquet")]
        pq.write_table(pa.table({"ids": pa.array(list(_corpus(rows, seed=len(split))), pa.list_(pa.int32()))}), files[split][0])
    net = Net(name="word2vec", params=_model().cfg, input_shape=(12,), num_outputs=1, task="embedding")
    cfg = TrainConfig(epochs=2, batch_size=64, average_every=2, sync="average", lr=0.05, seed=5, checkpoint_every=0)
    result = launch(spark, TrainTask(net=net, train=cfg, train_files=files["train"], val_files=files["val"], threads=1),
                    "horovod", 2)
    assert (result["backend"], result["world_size"]) == ("horovod", 2)

    torch.manual_seed(cfg.seed)  # what each worker did, one at a time in this process
    model = build(net)
    for epoch in (1, 2):
        start = copy.deepcopy(model.state_dict())
        for rank in (0, 1):  # each worker's 128 rows: one chunk of 64 x 2 rows, then the sync
            alone = copy.deepcopy(model)
            alone.load_state_dict(start)
            shard = load_shard(files["train"], (12,), rank, 2, task="embedding")[0]
            alone.train_epoch(torch.from_numpy(shard), epoch, 2, SingleProcess(), lr=cfg.lr, sync_rows=128,
                              seed=_seed(cfg.seed, epoch, rank), shuffle=True)
            for name, value in alone.state_dict().items():
                model.state_dict()[name] += value - start[name]
    assert result["state_dict"]["context.weight"].abs().sum() > 0
    for table in ("embed.weight", "context.weight"):
        assert torch.allclose(result["state_dict"][table], model.state_dict()[table], atol=1e-6), table
    assert result["history"][-1]["val_pair_accuracy"] > 0.7


CONSUMER = WITHOUT_DLPIPE + textwrap.dedent("""
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    out = model.predict(pd.DataFrame({"word": ["Sun", "milk"]}))
    try:
        model.predict(pd.DataFrame({"word": ["sun", "nosuchword", "two words"]}))
        refused = ""
    except Exception as exc:
        refused = str(exc)
    print(json.dumps({"vectors": [v.tolist() for v in out["vector"]], "refused": refused}))
""")


@pytest.mark.slow
def test_a_corpus_through_prepare_train_evaluate_words_and_embed(spark, tmp_path):
    import deltalake

    from dlpipe.errors import DlpipeError
    from dlpipe.scoring import predict
    from dlpipe.stages import words

    landing = tmp_path / "landing"
    landing.mkdir()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(TOPICS[i % 2], 8)) for i in range(1200)]
    (landing / "part-00000.txt").write_text("\n".join(lines) + "\n")
    cfg = make_config(tmp_path, f"paths.landing={landing}", "data.name=topics", "data.text.min_count=1",
                      "data.text.max_length=12", "train.epochs=2", "train.batch_size=32", "train.backend=local",
                      "train.lr=0.025", "model.word2vec.dim=16", "model.word2vec.window=2", "model.word2vec.subsample=0",
                      "registry.model_name=topics_w2v", conf="conf/gutenberg_word2vec.yaml")
    stage("prepare", spark, cfg)
    trained = stage("train", spark, cfg)
    assert trained["metrics"]["val_pair_accuracy"] > 0.6

    evaluated = stage("evaluate", spark, with_run(cfg, trained["run_id"]))

    assert evaluated["champion"] and evaluated["model_uri"] == "models:/topics_w2v/1"
    m = evaluated["metrics"]
    assert m["test_pair_accuracy"] > 0.6 and 0 < m["test_loss"] < 6 * np.log(2) and m["test_rows"] > 50
    from mlflow.tracking import MlflowClient

    assert "plots/word_projection.png" in [a.path for a in MlflowClient().list_artifacts(trained["run_id"], "plots")]
    near = stage("words", None, cfg, action="similar", model="", word="Sun", terms=[], k=5)  # models:/<name>@champion
    assert near["nearest"][0]["word"] in TOPICS[0] and len({n["word"] for n in near["nearest"]} & set(TOPICS[0])) >= 4
    analogy = words.run(cfg.mlflow, action="analogy", model_uri="models:/topics_w2v@champion",
                        terms=["sun", "moon", "milk"], word="", k=3)
    assert analogy["question"] == "sun : moon :: milk : ?" and {"sun", "moon", "milk"}.isdisjoint(n["word"] for n in analogy["nearest"])
    with pytest.raises(ConfigError, match="--word 'nosuchword': not in the model's vocabulary of 12 words"):
        words.run(cfg.mlflow, action="similar", model_uri="models:/topics_w2v@champion", word="nosuchword", terms=[], k=5)

    embedded = stage("embed", spark, cfg, model="")

    written = embedded["embeddings"]
    table = deltalake.DeltaTable(written["uri"], version=written["version"]).to_pandas().set_index("word")
    assert sorted(table.index) == sorted(TOPICS[0] + TOPICS[1]) and (table["count"] > 0).all()
    assert table["count"].sum() == deltalake.DeltaTable(cfg.table_uri("vocab")).to_pandas()["count"].sum()
    with pytest.raises(DlpipeError, match="is a word2vec model: it maps words to vectors"):
        predict(spark, spark.range(1), evaluated["model_uri"])  # `dlpipe score` points to embed and words
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    consumer = subprocess.run([sys.executable, "-I", "-c", CONSUMER, "models:/topics_w2v/1"], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path, env=env)
    assert consumer.returncode == 0, consumer.stderr[-2000:]
    out = json.loads(consumer.stdout.strip().splitlines()[-1])
    assert np.allclose(out["vectors"][0], table.loc["sun", "vector"], atol=1e-6)
    assert np.allclose(out["vectors"][1], table.loc["milk", "vector"], atol=1e-6)
    assert "2 of 3 input rows rejected (row 1: unknown word 'nosuchword'; row 2: expected one word, got 2 tokens" in out["refused"]
