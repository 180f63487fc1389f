import os

import pytest
import torch

#: pytest-xdist workers sharing the machine (``make test`` runs two: ``-n 2``); 1 without xdist
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
#: torch threads per test process: the cores shared between the workers, at most 2 (the machines have 2 cores and
#: determinism matters more than speed here). Under xdist the commands the tests start get as many
#: (``OMP_NUM_THREADS``): two single-threaded workers ran a bundle command 1.8x faster than one two-threaded one.
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def pytest_collection_modifyitems(config, items):
    """Under xdist (``make test``: whole modules to each worker, in collected order) the slow tests first, then the
    rest: the modules with long runs start at once and the quick ones fill the workers' last minutes. One process
    keeps the collected order (a module's tests together, its module fixtures built once)."""
    if WORKERS > 1:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: as fast, and immune to the slowdown of oversubscribed
    shared cores. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
