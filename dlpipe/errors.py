"""Expected failures. Each is printed by the CLI as ONE line `dlpipe: error: <message>` and exits
with its own documented code (docs/configuration.md, "Exit codes"); anything else is a bug and
keeps its traceback."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # another expected failure (lake/models actions, promotion lock timeout), or a bug (traceback)
EXIT_CONFIG = 2  # a bad config key or value, or a bad command line; nothing ran
EXIT_DATA_QUALITY = 3  # prepare stopped: too many rejected rows; no new train/val/test version
EXIT_MISSING_INPUT = 4  # a table, table version, landing zone, training run, model or alias does not exist
EXIT_TRACKING = 5  # the MLflow tracking server does not answer; nothing was trained or registered
EXIT_CONFLICT = 6  # another job committed to a table this job read; this job wrote nothing more; rerun is safe


class DlpipeError(Exception):
    """Base of the expected failures; `exit_code` is what the CLI returns."""

    exit_code = EXIT_ERROR


class ConfigError(DlpipeError, ValueError):
    """A bad config key or value; the message names the key and what was expected."""

    exit_code = EXIT_CONFIG


class DataQualityError(DlpipeError, ValueError):
    """prepare rejected more than data.max_rejected_fraction of its input."""

    exit_code = EXIT_DATA_QUALITY


class InputNotFound(DlpipeError, LookupError):
    """A stage's input does not exist (table, version, landing zone, run, model, alias)."""

    exit_code = EXIT_MISSING_INPUT


class TrackingUnreachable(DlpipeError, RuntimeError):
    """The MLflow tracking server does not answer; nothing was trained or registered."""

    exit_code = EXIT_TRACKING


class WorkersLost(DlpipeError, RuntimeError):
    """Elastic training had fewer than train.min_workers left and no way to get them back."""


class ConflictError(DlpipeError, RuntimeError):
    """Another job committed to a Delta table after this job read it (e.g. two overlapping
    prepare runs): this job's commit to it was refused. A rerun takes only what is left."""

    exit_code = EXIT_CONFLICT
