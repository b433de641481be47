"""Shared by the tests that train through the command line (tests/engine/test_train.py and the methods' CLI
tests): small CLI arguments, run() (main() in-process with a private cache) and the module-scoped fixture
teacher, a pspnet_small trained 3 iterations (a module imports it: `from cli_testing import teacher  # noqa`)."""
import pytest

from engine.train import main

FAST = ["--crop", "32", "--batch-size", "2", "--workers", "0", "--val-size", "4", "--log-interval", "2"]


def run(tmp, *args):
    """main() in-process with a private cache; returns the result dict."""
    return main([*FAST, "--cache-dir", str(tmp / "cache"), *args])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    run(tmp, "--method", "none", "--student", "pspnet_small", "--iters", "3", "--out", str(tmp / "t"))
    return str(tmp / "t" / "last.pt")
