"""Top-1 and top-5 error with the centre crop or §4.1's ten views, for one net or an ensemble (§6).

§4.1: "averaging the predictions made by the network's softmax layer on the ten patches".
§6: "averaging the predictions of five similar CNNs": the ensemble averages softmax outputs too.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from replicate import devices
from replicate.config import to_dict
from replicate.data.loader import Batch, DataConfig
from replicate.tracking import RecordError, write_json


def average_softmax(
    models: Sequence[nn.Module],
    views: torch.Tensor,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Class probabilities averaged over the views (B x V x 3 x H x W, or one view B x 3 x H x W)
    and over the models."""
    if views.dim() == 4:
        views = views.unsqueeze(1)
    batch, count = views.shape[:2]
    flat = views.flatten(0, 1).contiguous(memory_format=memory_format)
    probabilities = [model(flat).float().softmax(-1).reshape(batch, count, -1).mean(1) for model in models]
    return torch.stack(probabilities).mean(0)


def topk_correct(
    probabilities: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)
) -> dict[int, int]:
    """How many labels are among the k most probable classes, for each k (k capped at the classes)."""
    ranked = probabilities.argsort(dim=-1, descending=True)
    hits = ranked == labels[:, None]
    return {k: int(hits[:, : min(k, probabilities.shape[-1])].any(-1).sum()) for k in ks}


@torch.no_grad()
def evaluate(
    models: Sequence[nn.Module],
    batches: Iterable[Batch],
    device: torch.device | str = "cpu",
    description: str = "evaluate",
    total: int | None = None,
    progress: bool = True,
    memory_format: torch.memory_format = torch.contiguous_format,
    predictions: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Top-1/top-5 error (%) and the mean negative log-probability of the true class.

    Under torch.distributed each process evaluates its shard and the counts are summed.
    `predictions`: a list that receives each batch's (averaged softmax, labels), on the CPU and in
    the eval split's order (under torch.distributed, every process's shards put together).
    """
    for model in models:
        model.eval()
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    sums = torch.zeros(4, dtype=torch.float64)  # images, top-1 hits, top-5 hits, -log p
    for batch in tqdm(
        batches, desc=description, total=total, unit="batch", disable=not progress, leave=False
    ):
        views, labels = batch.pixels.to(device, non_blocking=True), batch.labels.to(device)
        probabilities = average_softmax(models, views, memory_format)
        labels = labels.to(probabilities.device)
        sums += _counts(probabilities, labels)
        if predictions is not None:
            kept.append((probabilities.float().cpu(), labels.cpu()))
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(sums)
    if predictions is not None:
        predictions.extend(_in_split_order(kept) if distributed else kept)
    return _errors(sums)


def _counts(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """images, top-1 hits, top-5 hits and the summed -log p of the true class, in float64."""
    hits = topk_correct(probabilities, labels)
    nll = -probabilities.gather(1, labels[:, None]).clamp_min(1e-12).log().sum()
    return torch.tensor([len(labels), hits[1], hits[5], float(nll)], dtype=torch.float64)


def _errors(sums: torch.Tensor) -> dict[str, float]:
    """`_counts` summed, as top-1/top-5 error (%) and mean loss."""
    images = max(int(sums[0]), 1)
    return {
        "images": int(sums[0]),
        "top1_error": 100 * (1 - float(sums[1]) / images),
        "top5_error": 100 * (1 - float(sums[2]) / images),
        "loss": float(sums[3]) / images,
    }


def _in_split_order(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every process's batches put together: global batch b is rank 0's slice of it, then rank 1's
    (`EpochBatches` without shuffling), and every rank sees the same number of batches."""
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, kept)
    return [
        (torch.cat([shard[b][0] for shard in shards]), torch.cat([shard[b][1] for shard in shards]))
        for b in range(len(kept))
    ]


def predictions_arrays(predictions: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """`evaluate`'s kept batches as one (images x classes) float32 array and one int64 label array."""
    probabilities = torch.cat([p for p, _ in predictions]).numpy().astype(np.float32)
    return probabilities, torch.cat([labels for _, labels in predictions]).numpy().astype(np.int64)


def write_predictions(path: Path, labels: np.ndarray, by_views: dict[str, np.ndarray]) -> None:
    """predictions.npz: each eval image's label and its averaged softmax under each protocol (views),
    in the eval split's order: what an ensemble or a later analysis needs, without a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, labels=labels, **by_views)
    os.replace(partial, path)


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    """A predictions.npz as {labels, <views>: probabilities}; a clear error if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise RecordError(f"{path}: not a readable predictions record ({error})") from None


def errors_from_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1/top-5 error (%) and loss, as `evaluate` computes them, from kept probabilities."""
    return _errors(_counts(torch.from_numpy(probabilities).double(), torch.from_numpy(labels)))


def evaluation_lines(record: dict) -> str:
    """An evaluation.json record as one line per protocol, for the terminal."""
    return "\n".join(
        f"{views}: top-1 error {result['top1_error']:.2f}%, top-5 error {result['top5_error']:.2f}% "
        f"on {result['images']} images ({record['dataset']} {record['split']}, {record['precision']})"
        for views, result in record["views"].items()
    )


def write_evaluation(
    out_dir: Path,
    results: dict[str, dict[str, float]],
    data: DataConfig,
    source: dict,
    runs: list[dict],
    weights: str,
    device: torch.device,
    precision: str,
    name: str = "evaluation.json",
    marks: dict | None = None,
    classes: list[str] | None = None,
) -> dict:
    """out_dir/evaluation.json, the one record of a final evaluation, whether training wrote it or
    `evaluate` did: `results` by views, the data it was measured on (the config, and the `source`
    that produced its store: `Prepared.source`), the runs (dir, epoch, step of their weights;
    several: an ensemble), and the device and precision it was computed in. `name`: another file in
    out_dir, for an evaluation that is not the run's own, which `marks` say (runs.evaluate_runs)."""
    record = {
        "dataset": data.dataset,
        "split": data.eval_split,
        "source": source,
        "runs": runs,
        "weights": weights,
        "device": devices.describe(device),
        "precision": precision,
        "views": results,
        "data": to_dict(data),
        "classes": list(classes or []),  # in label order: an ensemble's runs must agree on them
        **(marks or {}),
    }
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record
