"""engine/datafree/generator.py: DFAD's generator (output shape and range, ImageNet mapping, initialisation)."""
import pytest
import torch

from engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from engine.datafree.generator import Generator


def test_generator_shape_range_mapping_and_init():
    torch.manual_seed(0)
    g = Generator(nz=256, size=(32, 48))
    z = torch.randn(6, 256)
    y, x = g.raw(z), g(z)
    assert y.shape == x.shape == (6, 3, 32, 48)
    assert y.min() >= -1 and y.max() <= 1 and y.std() > 0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ((y + 1) / 2 - mean) / std)  # tanh -> [0, 1] RGB -> ImageNet normalisation
    assert (x >= -mean / std - 1e-6).all() and (x <= (1 - mean) / std + 1e-6).all()
    w = g.project.weight
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)
    bn = torch.cat([m.weight for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01) and bn.std().item() == pytest.approx(0.02, rel=0.3)
    assert [m.out_channels for m in g.main if isinstance(m, torch.nn.ConvTranspose2d)] == [256, 128, 64, 64]
    with pytest.raises(ValueError, match="multiples of 16"):
        Generator(size=(40, 48))
