"""Sample pictures a person can read: small images enlarged without blur, class rows named."""

import torch
from torchvision.io import read_image

from jemkit.evaluate.samples import readable_grid, save_grid


def test_small_images_are_enlarged_nearest_neighbour_to_a_readable_size():
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    grid = readable_grid(images, nrow=3)
    factor, pad = 6, 6  # 8 px -> 48 px, padding grows with the factor
    assert grid.shape == (3, 2 * 48 + 3 * pad, 3 * 48 + 4 * pad)
    first = grid[0, pad : pad + 48, pad : pad + 48]
    expected = ((images[0, 0] + 1) / 2).repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    torch.testing.assert_close(first, expected)  # each pixel a sharp 6x6 block, values mapped to [0, 1]
    large = readable_grid(torch.zeros(2, 3, 64, 64), nrow=2)
    assert large.shape[1] == 64 + 2 * 2  # already readable: left at its size


def test_a_class_grid_gets_one_label_per_row(tmp_path):
    grid = readable_grid(torch.zeros(20, 1, 8, 8), nrow=2)
    plain = read_image(str(save_grid(grid, tmp_path / "plain.png")))
    labelled = read_image(str(save_grid(grid, tmp_path / "labelled.png", [f"class {c}" for c in range(10)])))
    assert plain.shape[1:] == grid.shape[1:]
    assert labelled.shape[2] > plain.shape[2]  # a margin on the left holds the labels
    margin = labelled[:3, :, : labelled.shape[2] - plain.shape[2]].float()
    assert (margin < 128).any()  # dark text drawn in the margin
