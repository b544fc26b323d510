"""jemkit.ood.complexity: bits per value of losslessly compressed inputs, the part that corrects a density for
simple inputs (logpx_ic)."""

import zlib

import pytest
import torch
from torchvision.io import encode_png

from jemkit.ood.complexity import input_complexity
from jemkit.ood.scores import ood_scores
from jemkit.sampling import InputDomain


def test_simple_inputs_cost_fewer_bits_than_noise_and_the_sizes_are_the_compressors():
    torch.manual_seed(0)
    flat = torch.full((2, 1, 28, 28), -1.0)
    noise = torch.rand(2, 1, 28, 28) * 2 - 1
    bits = input_complexity(torch.cat([flat, noise]))
    assert bits[0] < 1.0 < 7.0 < bits[2]  # a black square needs under a bit a pixel (PNG headers), noise about 8
    png = len(encode_png(torch.zeros(1, 28, 28, dtype=torch.uint8), compression_level=9))
    assert bits[0].item() == pytest.approx(png * 8 / 784)
    rows = torch.zeros(3, 13)  # not an image: DEFLATE of the quantised values (the box's centre: level 128)
    expected = len(zlib.compress(bytes([128]) * 13, 9)) * 8 / 13
    assert input_complexity(rows).tolist() == pytest.approx([expected] * 3)


def test_inputs_are_quantised_in_the_domains_box():
    unit = torch.rand(4, 1, 8, 8)  # data in [0, 1]
    domain = InputDomain(low=0.0, high=1.0)
    torch.testing.assert_close(input_complexity(unit, domain), input_complexity(unit * 2 - 1))
    with pytest.raises(ValueError, match=r"expects a batch \[B, \.\.\.\]"):
        input_complexity(torch.zeros(5))


def test_complexity_is_a_part_the_scores_can_carry():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    scores = ood_scores(model, x, ["logpx", "complexity"])
    torch.testing.assert_close(scores["complexity"], input_complexity(x))
