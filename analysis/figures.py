"""The report's figures, drawn from run records; the notebooks in analysis/notebooks call these.

Each function returns a matplotlib Figure; `save` writes it as PNG and PDF into reports/figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: notebooks under nbclient, CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from analysis.stats import mean_ci  # noqa: E402

FIGURES_DIR = Path("reports/figures")


def save(
    figure: plt.Figure,
    name: str,
    out_dir: str | Path = FIGURES_DIR,
    formats: tuple[str, ...] = ("png", "pdf"),
) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{suffix}" for suffix in formats]
    for path in paths:
        figure.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(figure)
    return paths


# --- training curves -----------------------------------------------------------------------------


def epoch_curves(run_dir: str | Path) -> pd.DataFrame:
    """Per epoch of one run: validation top-1/top-5 error and loss, the learning rate and whether it
    was divided after that epoch (epochs.csv), and the mean training loss and batch top-1 error of
    the steps logged in it (steps.csv, which counts epochs from 0), with the run's name and seed."""
    run_dir = Path(run_dir)
    epochs = pd.read_csv(run_dir / "epochs.csv")
    steps_path = run_dir / "steps.csv"
    if steps_path.is_file():
        steps = pd.read_csv(steps_path).groupby("epoch")[["loss", "top1_error"]].mean()
        epochs["train_loss"] = [steps["loss"].get(e - 1, math.nan) for e in epochs["epoch"]]
        epochs["train_top1_error"] = [steps["top1_error"].get(e - 1, math.nan) for e in epochs["epoch"]]
    epochs["run"] = run_dir.parent.name  # runs/<name>/seed<k>: the experiment's name
    epochs["seed"] = run_dir.name
    return epochs


def training_curves(run_dirs: list[Path], chance: float | None = None) -> plt.Figure:
    """Training loss and validation top-1 error per epoch, one line per experiment (the runs' folder
    name): the mean over its seeds, with a 95% confidence band where there are several (seaborn).
    Dotted vertical lines where a run's learning rate was divided by 10 (§5), `chance` as a grey
    line."""
    curves = pd.concat([epoch_curves(run) for run in run_dirs], ignore_index=True)
    several = curves.groupby("run")["seed"].nunique().max() > 1
    band = ("ci", 95) if several else None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    panels = [("train_loss", "loss (mean of the logged steps)"), ("val_top1_error", "top-1 error (%)")]
    for axis, (column, label) in zip(axes, panels, strict=True):
        if column in curves:
            sns.lineplot(curves, x="epoch", y=column, hue="run", errorbar=band, marker="o", ax=axis)
        axis.set(xlabel="epoch", ylabel=label)
        axis.grid(alpha=0.3)
    axes[0].set_title("training loss")
    axes[1].set_title("validation top-1 error" + (" (band: 95% CI over seeds)" if several else ""))
    if chance is not None:
        axes[1].axhline(chance, color="grey", lw=1, label=f"chance ({chance:g}%)")
    drops = sorted(set(curves.loc[curves["lr_reduced"].astype(str) == "True", "epoch"]))
    for number, epoch in enumerate(drops):
        for axis in axes:
            axis.axvline(epoch + 0.5, color="k", ls=":", lw=1, label="lr / 10" if number == 0 else None)
    for axis in axes:
        handles, labels = axis.get_legend_handles_labels()
        if handles:
            axis.legend(handles, labels, fontsize=7)
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    return figure


# --- Figure 1 -----------------------------------------------------------------------------------


def figure1(record: dict, curves: pd.DataFrame) -> plt.Figure:
    """Training error vs epoch for the kept learning rate of each activation (every seed): ReLU
    solid, tanh dashed, as in the paper's Figure 1; the 25% line."""
    figure, axis = plt.subplots(figsize=(6, 4))
    styles = {"relu": ("-", "tab:blue"), "tanh": ("--", "tab:red")}
    for activation, result in record["activations"].items():
        kept = curves[(curves["activation"] == activation) & (curves["lr"] == result["lr"])]
        for seed, run in kept.groupby("seed"):
            style, colour = styles[activation]
            axis.plot(
                run["epoch"],
                run["train_error"],
                ls=style,
                color=colour,
                label=f"{activation} (lr {result['lr']:g})" if seed == kept["seed"].min() else None,
            )
    threshold = record["config"]["threshold"]
    ratio = (
        record["tanh_over_relu"]
        if isinstance(record["tanh_over_relu"], str)
        else f"{record['tanh_over_relu']:.1f}"
    )
    axis.axhline(threshold, color="k", lw=1, ls=":", label=f"{threshold:g}% training error")
    axis.set(
        xlabel="epoch",
        ylabel="training error (%)",
        ylim=(0, 80),
        title=f"Figure 1: tanh/ReLU epochs = {ratio} (paper ~{record['paper_tanh_over_relu']:g})",
    )
    axis.legend()
    axis.text(0.99, 0.01, record["dataset"], transform=axis.transAxes, ha="right", va="bottom", fontsize=7)
    return figure


# --- Figure 3: conv1 kernels --------------------------------------------------------------------


def colourfulness(kernels: torch.Tensor) -> np.ndarray:
    """Per kernel (K x 3 x h x w): the share of its energy that is colour, ||w - grey(w)|| / ||w||,
    grey(w) the mean over the RGB channels. 0: the same pattern in R, G and B (colour-agnostic)."""
    grey = kernels.mean(dim=1, keepdim=True)
    colour = (kernels - grey).flatten(1).norm(dim=1)
    return (colour / kernels.flatten(1).norm(dim=1).clamp_min(1e-12)).numpy()


def conv1_kernels(state: dict) -> list[torch.Tensor]:
    """Each column's conv1 weights from a checkpoint's model state."""
    keys = sorted(k for k in state if k.endswith("convs.conv1.0.weight"))
    return [state[k].float().cpu() for k in keys]


def figure3(state: dict) -> tuple[plt.Figure, list[float]]:
    """The first layer's kernels as images, one panel per column (the paper's upper 48 / lower 48),
    each titled with its mean colourfulness; returns the figure and the per-column means."""
    columns = conv1_kernels(state)
    figure, axes = plt.subplots(len(columns), 1, figsize=(10, 2.6 * len(columns)), squeeze=False)
    means = []
    for index, (axis, kernels) in enumerate(zip(axes[:, 0], columns, strict=True)):
        count, per_row = len(kernels), 16
        rows = math.ceil(count / per_row)
        side = kernels.shape[-1]
        canvas = np.ones((rows * (side + 1), per_row * (side + 1), 3))
        for k, kernel in enumerate(kernels):
            image = kernel.permute(1, 2, 0).numpy()
            image = (image - image.min()) / max(image.max() - image.min(), 1e-12)  # each kernel stretched
            r, c = divmod(k, per_row)
            canvas[r * (side + 1) : r * (side + 1) + side, c * (side + 1) : c * (side + 1) + side] = image
        score = colourfulness(kernels)
        means.append(float(score.mean()))
        axis.imshow(canvas, interpolation="nearest")
        axis.set_axis_off()
        axis.set_title(
            f"column {index + 1}: {count} kernels, mean colourfulness {score.mean():.3f} "
            f"(median {np.median(score):.3f})",
            fontsize=9,
        )
    figure.suptitle(
        "Figure 3: conv1 kernels by column (paper: column 1 colour-agnostic, column 2 colour-specific)",
        fontsize=10,
    )
    return figure, means


# --- Figure 4: nearest neighbours in FC7 space ------------------------------------------------


@torch.no_grad()
def fc7_of(model, store, augment, indices: list[int], batch: int = 64) -> torch.Tensor:
    """FC7 activations (after ReLU) of the centre crops of `indices` in `store`, computed on the
    model's device, returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    parts = [
        model.fc7_features(augment.centre(store.images(indices[i : i + batch])).to(device)).cpu()
        for i in range(0, len(indices), batch)
    ]
    return torch.cat(parts)


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    """Indices into `pool` of the k rows nearest each query by Euclidean distance (§6.1)."""
    return torch.cdist(queries, pool).topk(k, largest=False).indices


def figure4(query_images: np.ndarray, neighbour_images: np.ndarray, titles: list[str]) -> plt.Figure:
    """Rows: a test image, then its nearest training images in FC7 space (uint8 H x W x 3)."""
    rows, k = neighbour_images.shape[:2]
    figure, axes = plt.subplots(rows, k + 1, figsize=(1.6 * (k + 1), 1.7 * rows), squeeze=False)
    for row in range(rows):
        axes[row, 0].imshow(query_images[row])
        axes[row, 0].set_title(titles[row], fontsize=7)
        for column in range(k):
            axes[row, column + 1].imshow(neighbour_images[row, column])
    for axis in axes.flat:
        axis.set_axis_off()
    figure.suptitle("Figure 4: test images (left) and the training images nearest in FC7 space", fontsize=9)
    return figure


# --- the ablation chart -------------------------------------------------------------------------


def ablation_chart(deltas: dict[str, list[float]], paper: dict[str, float | None]) -> plt.Figure:
    """Measured top-1 error change (variant - baseline) per comparison: each seed's change as a dot
    (seaborn), their mean with its 95% t-interval (`analysis.stats.mean_ci`, as in the tables), and
    the paper's claimed change as a red diamond."""
    names = list(deltas)
    seeds = pd.DataFrame(
        [{"variant": name, "delta": delta} for name, values in deltas.items() for delta in values]
    )
    figure, axis = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    sns.stripplot(seeds, x="delta", y="variant", order=names, color="tab:grey", alpha=0.6, size=4, ax=axis)
    for row, name in enumerate(names):
        estimate = mean_ci(deltas[name])
        axis.errorbar(
            estimate.mean,
            row,
            xerr=0 if estimate.n < 2 else estimate.half_width,
            fmt="o",
            color="tab:blue",
            capsize=4,
            label="measured (mean, 95% CI; dots: seeds)" if row == 0 else None,
        )
        axis.annotate(
            f"n={estimate.n}", (estimate.mean, row), textcoords="offset points", xytext=(0, 6), fontsize=7
        )
        if paper.get(name) is not None:
            axis.plot(
                paper[name],
                row,
                marker="D",
                color="tab:red",
                ls="none",
                label="paper" if "paper" not in [t.get_label() for t in axis.lines] else None,
            )
    axis.axvline(0, color="k", lw=1)
    axis.set(xlabel="top-1 error change (points; > 0: the variant is worse)", ylabel="", title="Ablations")
    axis.tick_params(axis="y", labelsize=8)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="x")
    return figure
