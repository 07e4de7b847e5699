"""`dlpipe retrain`: the nightly job. Retrains only when the training tables have a version the
champion was not trained on, and promotes the challenger only if it beats the champion on the
same pinned holdout by registry.min_improvement on registry.metric. Safe to run twice and to
run concurrently: the decision and every alias move happen under the registry lock, and one set
of table versions is promoted at most once."""

from __future__ import annotations

import dataclasses

from mlflow.tracking import MlflowClient
from pyspark.sql import SparkSession

from dlpipe import evaluation, registry, tracking
from dlpipe.config import Config
from dlpipe.refs import TableRef
from dlpipe.registry import CHALLENGER, CHAMPION
from dlpipe.stages import evaluate, train

OUTCOME = "dlpipe.retrain.outcome"  # tag on a version once retrain has decided about it


def say(message: str) -> None:
    print(f"dlpipe: {message}", flush=True)


def holdout_metrics(spark: SparkSession, cfg: Config, model_uri: str, test: TableRef) -> dict[str, float]:
    """The champion on the challenger's holdout, exactly as evaluate measured the challenger."""
    classes, label_ids = evaluation.label_view(cfg.data, cfg.model.task, model_uri)
    metrics, _, _ = evaluation.holdout(spark, model_uri, test, task=cfg.model.task, label_ids=label_ids,
                                       num_classes=len(classes))
    return metrics


def train_stage(spark: SparkSession, cfg: Config) -> dict:
    """The train stage with this config (what `dlpipe train` runs)."""
    return train.run(spark, cfg.train, cfg.model, cfg.data, cfg.mlflow, model_name=cfg.registry.model_name,
                     table_uris=cfg.model_tables(), resolved_config=cfg.to_dict())


def run(spark: SparkSession, cfg: Config) -> dict:
    """Runs the train and evaluate stages when there is new data, so it takes the whole config. The
    summary's model_uri is the champion after the run (what the nightly score takes next)."""
    summary = _decide(spark, cfg)
    after = summary.get("champion_after")
    return summary | {"model_uri": f"models:/{cfg.registry.model_name}/{after}" if after else None}


def _decide(spark: SparkSession, cfg: Config) -> dict:
    registry.check_reachable(cfg.mlflow.tracking_uri)  # before anything is trained
    tracking.setup(cfg.mlflow)
    client = MlflowClient()
    r, name = cfg.registry, cfg.registry.model_name
    current = train.input_tables(cfg.train.tables, cfg.model_tables())
    champion = registry.alias_version(client, name, CHAMPION)
    summary = {"step": "retrain", "model_name": name, "metric": r.metric,
               "tables": {s: ref.to_dict() for s, ref in current.items()},
               "champion_before": int(champion.version) if champion else None}
    if champion and registry.tables_of(champion) == current:
        reason = f"no new data: champion version {champion.version} was trained on {current['train']}, the newest version"
        say(reason)
        return summary | {"action": "none", "reason": reason, "champion_after": int(champion.version)}
    earlier = registry.versions_trained_on(client, name, current)
    decided = [v for v in earlier if v.tags.get(OUTCOME)]
    if decided:
        v = decided[-1]
        reason = f"version {v.version} was already trained on these table versions ({v.tags[OUTCOME]})"
        say(f"nothing to do: {reason}")
        return summary | {"action": "none", "reason": reason, "challenger_version": int(v.version),
                          "champion_after": summary["champion_before"]}

    if earlier:  # registered by a job that died before deciding: decide now, do not retrain
        challenger = earlier[-1]
        say(f"version {challenger.version} was trained on these tables but never decided about: deciding now")
    else:
        say(f"new data: training a challenger on {current['train']}"
            + (f" (champion version {champion.version} was trained on {champion.tags.get('dlpipe.table.train')})"
               if champion else " (no champion yet)"))
        trained = train_stage(spark, dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, tables={s: str(ref) for s, ref in current.items()})))
        current = {s: TableRef.of(t) for s, t in trained["tables"].items()}
        evaluated = evaluate.run(spark, cfg.data, cfg.model, cfg.registry, cfg.mlflow, run_id=trained["run_id"], promote=False)
        challenger = client.get_model_version(name, str(evaluated["model_version"]))
    challenger_score = registry.metric_of(challenger, r.metric)
    summary |= {"tables": {s: ref.to_dict() for s, ref in current.items()}, "challenger_version": int(challenger.version), "challenger_run_id": challenger.run_id,
                "challenger_metrics": {k: registry.metric_of(challenger, k) for k in evaluation.METRICS[cfg.model.task]
                                       if registry.metric_of(challenger, k) is not None}}

    on_holdout: dict[str, dict[str, float]] = {}

    def champion_metrics(version) -> dict[str, float]:
        if str(version.version) not in on_holdout:
            say(f"evaluating champion version {version.version} on the same holdout {current['test']}")
            on_holdout[str(version.version)] = holdout_metrics(spark, cfg, f"models:/{name}/{version.version}", current["test"])
        return on_holdout[str(version.version)]

    if champion:
        champion_metrics(champion)  # outside the lock; re-checked below
    with registry.lock(client, name, r.lock_ttl_s, r.lock_wait_s):
        champion = registry.alias_version(client, name, CHAMPION)  # may have moved while we trained
        rivals = [v for v in registry.versions_trained_on(client, name, current)
                  if str(v.version) != str(challenger.version) and v.tags.get(OUTCOME, "").startswith("promoted")]
        if champion and str(champion.version) == str(challenger.version):
            wins, why = True, "it is already champion"
        elif rivals:
            wins, why = False, (f"version {rivals[0].version}, trained on the same table versions, was promoted "
                                "by another retrain")
        elif champion is None:
            wins, why = evaluation.good_enough(cfg.model.task, summary["challenger_metrics"], r.min_accuracy)
            why = f"no champion yet; {why}"
        else:
            reference = champion_metrics(champion)
            summary["champion_metrics_on_holdout"] = reference
            wins, why = registry.beats(r.metric, challenger_score, reference[r.metric], r.min_improvement)
        if wins:
            registry.promote(client, name, str(challenger.version))
        else:
            registry.set_aliases(client, name, [(CHALLENGER, str(challenger.version))])
        outcome = ("promoted: " if wins else "not promoted: ") + why
        client.set_model_version_tag(name, str(challenger.version), OUTCOME, outcome)
    if wins:
        say(f"promoted {name} version {challenger.version} to champion: {why}")
    else:
        say(f"{name} version {challenger.version} is NOT promoted (alias challenger): {why}")
    after = int(challenger.version) if wins else (int(champion.version) if champion else None)
    return summary | {"action": "promoted" if wins else "not promoted", "reason": why, "champion_after": after}
