"""Training sets: a loader per format, the :class:`TrainingSet`, and the training dataset.

A :class:`TrainingSet` is a list of absolute image paths with contiguous integer labels. One
module per format (:mod:`.sfm120k`, :mod:`.gldv2`, :mod:`.gldv1`, :mod:`.folder`, :mod:`.csvfile`)
reads its label files without opening the images; :func:`load_training_set` picks the loader of a
format name from :data:`LOADERS`. :class:`TrainDataset` and the collate functions turn the set into
batches. ``docs/data.md`` describes the formats, the size cache and the augmentation.
"""

from dtop.data.training.csvfile import load_csv
from dtop.data.training.dataset import TrainDataset, collate_skip_bad, collate_tuples
from dtop.data.training.folder import load_image_folder
from dtop.data.training.gldv1 import GLDV1_CSV, load_gldv1
from dtop.data.training.gldv2 import GLDV2_CLEAN_CSV, gldv2_relative_path, load_gldv2_clean, read_landmark_ids
from dtop.data.training.registry import FORMATS, LOADERS, TrainingSource, load_training_set
from dtop.data.training.sfm120k import SFM_PKL, load_sfm120k, read_sfm_db, sfm_relative_path
from dtop.data.training.trainingset import INDEX_KEYS, TrainingSet

__all__ = [
    "FORMATS",
    "GLDV1_CSV",
    "GLDV2_CLEAN_CSV",
    "INDEX_KEYS",
    "LOADERS",
    "SFM_PKL",
    "TrainDataset",
    "TrainingSet",
    "TrainingSource",
    "collate_skip_bad",
    "collate_tuples",
    "gldv2_relative_path",
    "load_csv",
    "load_gldv1",
    "load_gldv2_clean",
    "load_image_folder",
    "load_sfm120k",
    "load_training_set",
    "read_landmark_ids",
    "read_sfm_db",
    "sfm_relative_path",
]
