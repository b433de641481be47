import pytest

import kernels._dispatch as dispatch
from kernel_testing import force_backend


@pytest.fixture
def fused(monkeypatch):
    """Force the Triton path (interpreted on CPU) and poison every buffer a kernel must fill."""
    force_backend("triton", monkeypatch)


@pytest.fixture(params=["default", "small"])
def row_tiles(request, monkeypatch):
    """Run row kernels with the shipped tiling and with tiny blocks/chunks, so that small test tensors
    still go through several loop steps and several splits per row."""
    if request.param == "small":
        monkeypatch.setattr(dispatch, "ROW_BLOCK", 16)
        monkeypatch.setattr(dispatch, "ROW_CHUNK", 32)
        monkeypatch.setattr("kernels.angular.CPP_CHUNK", 32)  # the C++ kernels' splits
        monkeypatch.setattr("kernels.bn_stat.CPP_CHUNK", 32)
    return request.param
