import pytest
import torch


@pytest.fixture
def images() -> torch.Tensor:
    """Two 224x224 crops on the paper's pixel scale (0-255 minus a mean: roughly +-128)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 224, 224, generator=generator) * 255 - 128
