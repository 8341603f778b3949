"""Shared fixtures, and the test lanes: ``tests/unit`` (fast) and ``tests/e2e`` (subprocess CLI, Ray, S3,
Chromium), which is marked ``slow`` here, as are the few unit tests marked by hand.

``python -m pytest -m "not slow"`` is the fast lane (under 2 minutes on 2 cores); ``python -m pytest`` runs all.
Helpers live in :mod:`helpers` (``tests/helpers/``): tiny models, exports, the CLI runner, S3, a browser."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.models import tiny_loaded_model

@pytest.fixture
def tiny_model():
    return tiny_loaded_model()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_configure(config):
    # The user's cache (calibration tables steer --backend auto; compiled OpenVINO models) stays out of tests.
    import atexit
    import os
    import shutil
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="rddm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)
