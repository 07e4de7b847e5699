"""dlpipe: raw data -> Delta -> distributed PyTorch training -> MLflow registry -> batch scoring."""

__version__ = "0.1.0"
