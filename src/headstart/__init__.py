"""headstart: turn a folder of photos into an accurate image classifier by transfer learning."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["ImageClassifier", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import headstart` (and `headstart --help`) stays fast.
    if name == "ImageClassifier":
        from headstart.api import ImageClassifier

        return ImageClassifier
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")
