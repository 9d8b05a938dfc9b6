"""What is computed once and kept on disk: the decode -> inference pipeline (`pipeline`), the content-keyed
feature cache (`features`) and the fine-tuning boundary store (`boundary`)."""

from headstart.cache.features import FeatureCache, content_key
from headstart.cache.pipeline import decoded_batches, extract

__all__ = ["FeatureCache", "content_key", "decoded_batches", "extract"]
