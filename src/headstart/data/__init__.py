"""Finding and reading the photos: samples and splits (`dataset`), class-folder scanning (`scan`), manifests
(`manifest`), one file -> RGB (`imageio`)."""

from headstart.data.dataset import SPLITS, Dataset, Sample, split_rows
from headstart.data.imageio import IMAGE_EXTENSIONS, ImageDecodeError, is_image_path, load_rgb
from headstart.data.inputs import list_images
from headstart.data.scan import scan_folder, typical_short_side
from headstart.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS", "SPLITS", "DataError", "Dataset", "ImageDecodeError", "Sample", "is_image_path",
    "list_images", "load_rgb", "scan_folder", "split_rows", "typical_short_side",
]
