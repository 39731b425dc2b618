import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from attnmem.viz import plot_attention  # noqa: E402


def test_plot_attention_writes_a_heatmap(tmp_path):
    weights = torch.softmax(torch.randn(4, 6), -1)
    fig = plot_attention(weights, list("abcdef"), ["w", "x", "y", "z"], title="alignment")
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (4, 6)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list("abcdef")
    path = tmp_path / "alignment.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000


def test_plot_attention_checks_its_labels():
    with pytest.raises(ValueError, match="source_labels has 2 labels for 6 positions"):
        plot_attention(torch.rand(4, 6), ["a", "b"])
    with pytest.raises(ValueError, match="weights must be"):
        plot_attention(torch.rand(2, 3, 4))
