"""Plots of attention: alignment heatmaps as the Bahdanau et al. (2015) paper shows them."""


def plot_attention(weights, source_labels=None, target_labels=None, ax=None, title=None):
    """Heatmap of an alignment: weights (target length, source length), rows summing to one
    (a tensor or array; one head of one example). Source tokens run along the top, target
    tokens down the side, darker is lower weight. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    weights = np.asarray(weights)
    if weights.ndim != 2:
        raise ValueError(f"weights must be (target length, source length), got shape "
                         f"{weights.shape}")
    for name, labels, size in (("source_labels", source_labels, weights.shape[1]),
                               ("target_labels", target_labels, weights.shape[0])):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{name} has {len(labels)} labels for {size} positions")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3, 0.45 * weights.shape[1] + 1.5),
                                      max(3, 0.45 * weights.shape[0] + 1)))
    ax.imshow(weights, cmap="gray", vmin=0.0, vmax=max(1e-9, float(weights.max())),
              aspect="auto")
    ax.xaxis.tick_top()
    if source_labels is not None:
        ax.set_xticks(range(len(source_labels)), labels=source_labels, rotation=90)
    if target_labels is not None:
        ax.set_yticks(range(len(target_labels)), labels=target_labels)
    if title:
        ax.set_title(title, pad=20)
    ax.figure.tight_layout()
    return ax.figure
