"""Tuning: the learning-rate range test and Optuna studies (optuna is an optional extra, imported lazily)."""

from .lr_finder import LRFinderResult, lr_finder
from .optuna import tune
from .study_storage import DEFAULT_STORAGE, storage

__all__ = ["DEFAULT_STORAGE", "LRFinderResult", "lr_finder", "storage", "tune"]
