"""Image sources (folders, bundled real sets) and PIL/torch transforms. The names are imported on first use, so that
the data-spec help (:data:`DATA_SPEC_HELP`) stays light: the CLI reads it without importing torch."""

_HOMES = {"DATA_SPEC_HELP": "sources", "ImageItem": "sources", "ImageSource": "sources", "load_images": "sources",
          "open_source": "sources", "EvalTransform": "transforms", "TrainTransform": "transforms"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"raptor.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'raptor.data' has no attribute {name!r}")
