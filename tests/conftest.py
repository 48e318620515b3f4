import os

import pytest

from noise_robustness import mnist

os.environ.setdefault("PL_DISABLE_FORK", "1")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """MNIST unpacked once per test session from the files the package ships."""
    return str(mnist.prepare(tmp_path_factory.mktemp("data")))


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """In-process CLI calls get their arguments from ``args``, not from pytest's command line."""
    monkeypatch.setattr("sys.argv", ["noise_robustness"])
