"""PyTorch models and the training loop. Nothing here imports Spark, Horovod or MLflow."""
