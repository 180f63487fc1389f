import os

import pytest
import torch

# Tests run on CPU with few threads: the machines have 2 cores and determinism matters more than speed here.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
