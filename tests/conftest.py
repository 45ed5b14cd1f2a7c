"""Make the flat top-level modules (model, losses, data, train, eval) and tests/tiny.py importable."""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]


def pytest_configure(config):
    config.addinivalue_line("markers", "device: an equivalence test on M3_TEST_DEVICE (cpu unless set; "
                                       "bench/gpu_check.py runs them with M3_TEST_DEVICE=cuda)")


@pytest.fixture
def device():
    """torch.device(M3_TEST_DEVICE), "cpu" by default; a test asking for CUDA where there is none is skipped."""
    name = os.environ.get("M3_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"M3_TEST_DEVICE={name}, but torch.cuda.is_available() is False")
    return torch.device(name)
