from dl.models.cnn import CNN, CNNConfig

__all__ = ["CNN", "CNNConfig"]
