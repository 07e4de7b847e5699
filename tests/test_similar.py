"""Image similarity: embeddings of a whole image table on Spark, nearest images by cosine
similarity, KMeans cluster purity against the labels."""

from mlflow.tracking import MlflowClient

from dlpipe import lake
from tests.conftest import stage


def test_embed_then_an_images_nearest_neighbour_is_itself(spark, registered_small):
    cfg, evaluated = registered_small
    summary = stage("embed", spark, cfg, model="")
    table = lake.read_table(spark, summary["embeddings"]["uri"], summary["embeddings"]["version"])
    rows = table.count()
    assert rows == summary["embeddings"]["rows"] > 0
    assert summary["model_uri"] == f"models:/small_cnn/{evaluated['model_version']}"
    first = table.orderBy("key").first()
    assert len(first["embedding"]) == 32  # the last hidden layer of the small CNN (model.cnn.hidden=[32])
    k = summary["kmeans"]
    assert 0 < k["cluster_purity"] <= 1 and 0 < k["raw_pixel_cluster_purity"] <= 1 and k["k"] == len(cfg.data.classes)
    runs = MlflowClient(cfg.mlflow.tracking_uri).search_runs(
        [MlflowClient(cfg.mlflow.tracking_uri).get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
        "tags.`dlpipe.step` = 'embed'")
    assert runs and runs[0].data.metrics["cluster_purity"] == k["cluster_purity"]

    found = stage("similar", spark, cfg, image=first["source"], k=5)
    neighbours = found["neighbours"]
    assert len(neighbours) == 5 and neighbours[0]["key"] == first["key"]
    assert neighbours[0]["similarity"] > 0.999
    assert all(a["similarity"] >= b["similarity"] for a, b in zip(neighbours, neighbours[1:]))
