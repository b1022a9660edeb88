import warnings

import pytest
import torch

# Tiny models on a 2-core machine: one intra-op thread avoids oversubscription (and is faster for small ops).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*Unwrapped parameters detected.*")
    yield
