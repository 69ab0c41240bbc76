import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for helpers.py

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """The official MNIST / Fashion-MNIST files beside the checkout (as in CI); skip when absent."""
    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real data not found in {SHARED_DATA}")
    return SHARED_DATA
