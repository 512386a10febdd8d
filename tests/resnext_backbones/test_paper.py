"""The paper's arithmetic: the three equivalent forms of the block, parameter and FLOP counts."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_norm_stats
from torch.utils.flop_counter import FlopCounterMode

import resnext_backbones as rb
from resnext_backbones.trunk import Bottleneck

C, D = 4, 8  # cardinality, channels per path


def bn(x, norm, sl=slice(None)):
    return F.batch_norm(x, norm.running_mean[sl], norm.running_var[sl], norm.weight[sl], norm.bias[sl],
                        eps=norm.eps)


def path_3x3(block, x, g):
    """The g-th split-transform path up to its 3x3 conv: its own slice of conv1/bn1 and its 3x3 filters."""
    sl = slice(g * D, (g + 1) * D)
    h = F.relu(bn(F.conv2d(x, block.conv1.weight[sl]), block.bn1, sl))
    return F.relu(bn(F.conv2d(h, block.conv2.weight[sl], padding=1), block.bn2, sl))


def test_grouped_block_equals_sum_of_paths_and_concatenation():
    # planes 16, base width 32: width = 16 * 32/64 * C = C * D channels in C groups; 64 channels out = in
    block = randomize_norm_stats(Bottleneck(64, 16, 1, C, 32, torch.nn.BatchNorm2d)).eval()
    assert (block.conv2.groups, block.conv2.in_channels, block.conv3.out_channels) == (C, C * D, 64)
    x = torch.randn(2, 64, 9, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        form_c = block(x)
        # (a) aggregated residual transformations: sum over C paths, each ending in its own 1x1 to 64 channels
        form_a = sum(F.conv2d(path_3x3(block, x, g), block.conv3.weight[:, g * D:(g + 1) * D]) for g in range(C))
        form_a = F.relu(bn(form_a, block.bn3) + x)
        # (b) concatenate the C paths' 3x3 outputs, then one 1x1
        form_b = F.conv2d(torch.cat([path_3x3(block, x, g) for g in range(C)], 1), block.conv3.weight)
        form_b = F.relu(bn(form_b, block.bn3) + x)
    torch.testing.assert_close(form_a, form_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(form_b, form_c, rtol=1e-4, atol=1e-5)


def params_with_1000_class_fc(name):
    trunk = rb.resnext(name)
    return sum(p.numel() for p in trunk.parameters()) + trunk.out_channels["c5"] * 1000 + 1000


@pytest.mark.parametrize("name, published", [("resnext50_32x4d", 25_028_904), ("resnext101_32x8d", 88_791_336),
                                             ("resnext101_64x4d", 83_455_272)])
def test_parameter_counts_equal_torchvision_published(name, published):
    assert params_with_1000_class_fc(name) == published


@pytest.mark.parametrize("name, millions", [("resnext101_32x4d", 44.18), ("resnext152_32x4d", 59.95)])
def test_parameter_counts_equal_mmpretrain_published(name, millions):
    assert round(params_with_1000_class_fc(name) / 1e6, 2) == millions


def test_resnext50_flops_at_224px_equal_published_4_23_gmacs():
    with torch.device("meta"):
        trunk, x = rb.resnext("resnext50_32x4d"), torch.empty(1, 3, 224, 224)
    counter = FlopCounterMode(display=False)
    with counter:
        trunk(x)
    fc_macs = 2048 * 1000
    assert round((counter.get_total_flops() / 2 + fc_macs) / 1e9, 2) == 4.23
