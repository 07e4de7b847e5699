
import numpy as np
from PIL import Image

from pipelines.images import image_parser
from pipelines.split import hash_split as assign_split
from pipelines.sources import list_files, read_parsed

CLASSES = ["cat", "dog"]


def _decoded(spark, landing):
    return read_parsed(spark, list_files(landing), image_parser(landing, CLASSES, 4, 1))


def _png(path, value, size=(8, 8), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value).save(path, format="PNG")


def test_decode_normalizes_and_rejects_with_reasons(spark, tmp_path):
    landing = tmp_path / "landing"
    _png(landing / "cat" / "a.png", 255)
    _png(landing / "dog" / "b.png", 0, size=(16, 12), mode="RGB")  # other size and colour: resized, greyed
    (landing / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (landing / "dog" / "empty.png").write_bytes(b"")
    _png(landing / "horse" / "c.png", 10)
    rows = {r["key"]: r for r in _decoded(spark, str(landing)).collect()}
    assert set(rows) == {"cat/a.png", "dog/b.png", "dog/corrupt.png", "dog/empty.png", "horse/c.png"}
    assert rows["cat/a.png"]["label"] == 0 and rows["cat/a.png"]["error"] is None
    # stored as the decoded bytes (dlpipe.tensors): one uint8 per pixel, 255 = white
    assert rows["cat/a.png"]["pixels"] == bytes([255] * 16)
    assert rows["dog/b.png"]["label"] == 1 and rows["dog/b.png"]["pixels"] == bytes(16)
    assert rows["dog/corrupt.png"]["error"].startswith("cannot decode image")
    assert rows["dog/empty.png"]["error"] == "empty file"
    assert "unknown class folder 'horse'" in rows["horse/c.png"]["error"]
    assert rows["horse/c.png"]["source"].endswith("landing/horse/c.png")


def test_split_is_a_function_of_the_key_only(spark):
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    keys = [f"class_{i % 3}/img_{i}.png" for i in range(3000)]
    first = dict(assign_split(spark.createDataFrame([(k,) for k in keys], "key string"), fractions).select("key", "split").collect())
    # new files arrive, the order changes, other columns change: no existing row moves
    more = [(k, 1) for k in reversed(keys)] + [(f"class_9/new_{i}.png", 2) for i in range(500)]
    second = dict(assign_split(spark.createDataFrame(more, "key string, other int").repartition(3), fractions).select("key", "split").collect())
    assert all(second[k] == first[k] for k in keys)
    counts = {s: sum(1 for v in first.values() if v == s) for s in ("train", "val", "test")}
    assert 0.76 < counts["train"] / 3000 < 0.84 and 0.07 < counts["val"] / 3000 < 0.13


def test_split_is_stable_across_landing_roots(spark, tmp_path):
    for root in ("a", "b"):
        _png(tmp_path / root / "cat" / "same.png", 128)
    splits = set()
    for root in ("a", "b"):
        landing = str(tmp_path / root)
        df = assign_split(_decoded(spark, landing), {"train": 0.5, "val": 0.25, "test": 0.25})
        (row,) = df.select("key", "split").collect()
        assert row["key"] == "cat/same.png"
        splits.add(row["split"])
    assert len(splits) == 1


def test_one_split_function_for_every_kind():
    """The function tested above is the one prepare uses: no kind keeps its own copy."""
    import re
    from pathlib import Path

    import pipelines

    defining = [p.name for p in sorted(Path(pipelines.__file__).parent.glob("*.py")) if re.search(r"xxhash64\(", p.read_text())]
    assert defining == ["split.py"]
