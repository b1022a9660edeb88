import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*Unwrapped parameters detected.*")
    yield
