"""Compatibility for callers written before dlpipe.stages (issue 12): `prepare(spark, cfg)` and
`pinned_tables(cfg)` with their old signatures and return shapes. New code calls the stages."""

from __future__ import annotations

from dlpipe.config import Config
from dlpipe.refs import SPLITS  # noqa: F401  (re-exported)


def prepare(spark, cfg: Config) -> dict:
    from dlpipe.stages import prepare as stage

    return stage.run(spark, cfg.data, cfg.paths)


def pinned_tables(cfg: Config) -> dict[str, dict]:
    from dlpipe.stages.train import pinned_set

    refs, job = pinned_set({s: cfg.table_uri(s) for s in SPLITS})
    return {s: ref.to_dict() | ({"prepare_job": job} if job else {}) for s, ref in refs.items()}
