"""Image sources (folders, bundled real sets) and PIL/torch transforms."""

from raptor.data.sources import DATA_SPEC_HELP, ImageItem, ImageSource, load_images, open_source
from raptor.data.transforms import EvalTransform, TrainTransform

__all__ = ["DATA_SPEC_HELP", "EvalTransform", "ImageItem", "ImageSource", "TrainTransform", "load_images",
           "open_source"]
