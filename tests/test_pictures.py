"""jemkit.pictures: figures written as valid PNGs with the expected layout, bad inputs rejected, sample pictures a
person can read (small images enlarged without blur, class rows named)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from torchvision.io import read_image

from jemkit.metrics import ReliabilityDiagram, reliability_bins
from jemkit.pictures import readable_grid, reliability_diagram, save_figure, save_grid, score_histogram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.stat().st_size > len(PNG_SIGNATURE)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_reliability_diagram_written_as_png(tmp_path):
    logits = 2 * torch.randn(300, 5)
    y = torch.randint(0, 5, (300,))
    fig = reliability_diagram(*reliability_bins(logits.softmax(1), y, n_bins=10), title="digits")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # reliability + counts
    assert "ECE" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    path = save_figure(fig, tmp_path / "nested" / "dir" / "reliability.png")
    assert path == tmp_path / "nested" / "dir" / "reliability.png"
    _assert_png(path)


def test_reliability_diagram_from_metric_and_sequences(tmp_path):
    metric = ReliabilityDiagram(n_bins=4, from_logits=True)
    metric.update(torch.randn(50, 3), torch.randint(0, 3, (50,)))
    out = metric.compute()
    fig = reliability_diagram(out["bin_confidence"], out["bin_accuracy"], out["bin_counts"])
    assert len(fig.axes) == 2
    fig = reliability_diagram([0.1, 0.9], [0.0, 1.0], [3, 0])  # plain sequences, an empty bin
    _assert_png(save_figure(fig, tmp_path / "seq"))  # suffix added
    assert (tmp_path / "seq.png").is_file()


def test_reliability_diagram_rejects_bad_bins():
    with pytest.raises(ValueError, match="one length"):
        reliability_diagram(torch.rand(10), torch.rand(9), torch.ones(10))
    with pytest.raises(ValueError, match="one length"):
        reliability_diagram(torch.rand(10), torch.rand(10), torch.ones(11))
    with pytest.raises(ValueError, match="shape"):
        reliability_diagram(torch.rand(2, 5), torch.rand(2, 5), torch.ones(2, 5))
    with pytest.raises(ValueError, match="positive total"):
        reliability_diagram(torch.rand(5), torch.rand(5), torch.zeros(5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_diagram(torch.full((5,), 2.0), torch.rand(5), torch.ones(5))


def test_score_histogram_written_as_png(tmp_path):
    scores = {
        "digits (in)": torch.randn(200) + 3,
        "noise": torch.randn(150),
        "flipped": torch.cat([torch.randn(100), torch.tensor([-float("inf")])]),
    }
    fig = score_histogram(scores, title="log p(x)", xlabel="log p(x)", legend_extra={"noise": "AUROC 0.98"})
    assert len(fig.axes) == 1
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["digits (in)", "noise (AUROC 0.98)", "flipped [1 non-finite]"]
    _assert_png(save_figure(fig, tmp_path / "scores.png"))


def test_score_histogram_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        score_histogram({})
    with pytest.raises(ValueError, match="legend_extra"):
        score_histogram({"in": torch.randn(10)}, legend_extra={"out": "AUROC 1.0"})
    with pytest.raises(ValueError, match="shape"):
        score_histogram({"in": torch.randn(3, 3)})
    with pytest.raises(ValueError, match="no finite"):
        score_histogram({"in": torch.full((3,), float("nan"))})


def test_save_figure_rejects_other_formats(tmp_path):
    fig = score_histogram({"in": torch.zeros(4)})  # constant scores still plot
    with pytest.raises(ValueError, match="PNG"):
        save_figure(fig, tmp_path / "scores.jpg")


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
