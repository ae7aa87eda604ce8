"""seqtrain: train a network one block at a time, each to convergence, caching frozen features to HDF5."""

from seqtrain.models import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
