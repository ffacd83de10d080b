"""pytest fixtures and session setup only; the shared models live in models.py."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def convbn():
    from normswap.testing import randomize_bn

    from models import ConvBN

    torch.manual_seed(0)
    return randomize_bn(ConvBN(), (2, 3, 16, 16))
