"""Shared by the step / teacher / profile / DDP tests of tests/engine/: tiny pspnet_tiny CLI arguments, run(),
and the module-scoped fixture teacher (a random teacher checkpoint), which a test module imports to use it."""
import pytest
import torch

from engine.models import build_model
from engine.train import main

FAST = ["--crop", "32", "--batch-size", "2", "--workers", "0", "--val-size", "2", "--log-interval", "1",
        "--eval-interval", "0", "--teacher", "pspnet_tiny", "--student", "pspnet_tiny"]


def run(tmp, *args):
    return main([*FAST, "--cache-dir", str(tmp / "cache"), *args])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A randomly initialised teacher: these tests time and compare steps, they do not need a good one."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(1)
    torch.save(build_model("pspnet_tiny", 8).state_dict(), path)
    return str(path)
