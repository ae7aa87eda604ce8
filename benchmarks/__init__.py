"""seqtrain's benchmarks: python -m benchmarks.memory, python -m benchmarks.accuracy (or the scripts directly)."""
