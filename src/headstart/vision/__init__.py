"""Pixels for the network: the eval transform and views that travel with a backbone's weights (`preprocess`), and
training-time augmentation (`augment`)."""

from headstart.vision.preprocess import PreprocessConfig, eval_transform, eval_views, load_for_model, load_views

__all__ = ["PreprocessConfig", "eval_transform", "eval_views", "load_for_model", "load_views"]
