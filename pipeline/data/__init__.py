"""Data sets: 2-D toys, a known Gaussian mixture and user point files (toy2d)."""

from pipeline.data.toy2d import (
    DATASETS,
    DataError,
    load_file,
    prepare_splits,
    sample_toy,
)

__all__ = ["DATASETS", "DataError", "load_file", "prepare_splits", "sample_toy"]
