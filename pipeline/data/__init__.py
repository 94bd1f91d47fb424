"""Data sets: 2-D toys, a known Gaussian mixture and user point files (toy2d); image sets (images);
the prepare stage's call that gives either kind with its record (prepare)."""

from pipeline.data.images import IMAGE_DATASETS, load_image_data, load_uint8_file, split_image_data
from pipeline.data.toy2d import (
    DATASETS,
    DataError,
    load_file,
    prepare_splits,
    sample_toy,
)

__all__ = ["DATASETS", "IMAGE_DATASETS", "DataError", "load_file", "load_image_data", "load_uint8_file",
           "prepare_splits", "sample_toy", "split_image_data"]
