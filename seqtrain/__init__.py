"""seqtrain: train a network one block at a time, each to convergence, caching frozen features to HDF5."""

__all__ = ["load_model", "split", "train_stages"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The API loads on first use (PEP 562): `python -m seqtrain.run --help` answers without importing torch.
    if name == "train_stages":
        from seqtrain.api import train_stages

        return train_stages
    if name == "load_model":
        from seqtrain.api import load_model

        return load_model
    if name == "split":
        from seqtrain.splitting import split

        return split
    raise AttributeError(f"module 'seqtrain' has no attribute {name!r}")
