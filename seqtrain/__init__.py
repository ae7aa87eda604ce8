"""seqtrain: train a network one block at a time, each to convergence, caching frozen features to HDF5."""

from seqtrain.api import train_stages
from seqtrain.models import load_model
from seqtrain.splitting import split

__all__ = ["load_model", "split", "train_stages"]
__version__ = "0.1.0"
