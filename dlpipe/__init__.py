"""dlpipe: raw data -> Delta -> distributed PyTorch training -> MLflow registry -> batch scoring."""

__version__ = "0.1.0"


import os

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores are busy with other work
# (Spark tasks, another job) spinning threads starve each other and an LSTM step ran 10-60x slower
# with 2 threads than with 1. Read once, when torch loads its OpenMP runtime; set
# OMP_WAIT_POLICY=ACTIVE to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
