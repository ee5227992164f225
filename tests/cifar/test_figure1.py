import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from replicate.cifar.figure1 import Figure1Config
from replicate.cifar.net import CifarNet, CifarNetConfig
from replicate.config import ConfigError
from tests.conftest import HANG_GUARD_S, needs_mirror

ROOT = Path(__file__).resolve().parents[2]


def test_the_four_layer_net_has_the_layers_18pct_shapes():
    net = CifarNet()
    sizes = []
    net.features.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sizes == [(2, 64, 4, 4)]  # 32 -> 16 -> 8 -> 4 with cuda-convnet's 3/2 pools
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64] and all(c.kernel_size == (5, 5) for c in convs)
    assert abs(convs[0].weight.std().item() - 1e-4) < 2e-5 and abs(convs[1].weight.std().item() - 0.01) < 1e-3
    tanh = CifarNet(CifarNetConfig(activation="tanh"))
    assert sum(isinstance(m, torch.nn.Tanh) for m in tanh.modules()) == 3
    assert (
        sum(type(m).__name__ == "ResponseNorm" for m in CifarNet(CifarNetConfig(norm="lrn")).modules()) == 2
    )


def test_the_search_seed_comes_first():
    with pytest.raises(ConfigError, match="seeds must start with 0"):
        Figure1Config(seeds=[1])
    with pytest.raises(ConfigError, match="device: 'gpu' is not a device"):
        Figure1Config(device="gpu")


def figure1(*overrides: str) -> subprocess.CompletedProcess:
    """`python -m replicate figure1` with these overrides, as a user runs it."""
    command = [sys.executable, "-m", "replicate", "figure1", *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.mark.slow
@needs_mirror
def test_a_short_figure1_run_records_epochs_to_threshold_or_not_reached(tmp_path):
    result = figure1(
        "train_images=512", "max_epochs=2", "relu_lrs=[0.004]", "tanh_lrs=[0.008, 0.004]", "threshold=99",
        "seeds=[0]", f"out_dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "figure1.json").read_text())
    assert record["dataset"] == "JPEG-compressed CIFAR-10, the first 512 training images"
    assert record["device"].split()[0] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # device: auto
    assert record["activations"]["relu"]["epochs_to_threshold"] == [1]  # 99%: reached at once
    assert record["tanh_over_relu"] == 1.0 and record["paper_tanh_over_relu"] == 6.0
    assert "paper about 6" in result.stdout and "JPEG-compressed CIFAR-10" in result.stdout
    # tanh's second rate could only tie the first (1 epoch), so it was never run.
    assert [r["lr"] for r in record["runs"] if r["activation"] == "tanh"] == [0.008]
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert set(curves.columns) == {"activation", "lr", "seed", "epoch", "train_error"}
    unreachable = figure1(
        "train_images=256", "max_epochs=1", "relu_lrs=[0.004]", "tanh_lrs=[0.004]", "threshold=0",
        "seeds=[0]", f"out_dir={tmp_path / 'never'}",
    )  # fmt: skip
    assert unreachable.returncode == 0, unreachable.stderr
    never = json.loads((tmp_path / "never" / "figure1.json").read_text())
    assert never["activations"]["relu"]["epochs_to_threshold"] == ["not reached"]
    assert never["tanh_over_relu"] == "not reached"


def test_an_interrupted_figure1_reuses_its_finished_runs(tmp_path, monkeypatch, capsys):
    """Each finished run is kept in figure1.partial.json; run again with the same config, only the
    runs not yet made train (here a stand-in for training, stopped by Ctrl-C in the third run)."""
    from replicate.cifar import figure1

    fake_data = (torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), "four blank images")
    monkeypatch.setattr(figure1, "training_data", lambda config: fake_data)
    made, stop_at = [], [3]

    def train_until(images, labels, activation, lr, seed, config, limit):
        if len(made) + 1 == stop_at[0]:
            raise KeyboardInterrupt
        made.append((activation, seed))
        curve = [50.0, 20.0] if activation == "relu" else [60.0, 40.0, 24.0]
        return {"activation": activation, "lr": lr, "seed": seed, "curve": curve, "diverged": False,
                "epochs_to_threshold": len(curve)}  # fmt: skip

    monkeypatch.setattr(figure1, "train_until", train_until)
    config = Figure1Config(
        relu_lrs=[0.004], tanh_lrs=[0.016], seeds=[0, 1], out_dir=str(tmp_path), device="cpu"
    )
    with pytest.raises(KeyboardInterrupt):
        figure1.run_figure1(config)
    assert made == [("relu", 0), ("relu", 1)]
    assert len(json.loads((tmp_path / "figure1.partial.json").read_text())["runs"]) == 2
    stop_at[0] = 0  # no more interruptions
    record = figure1.run_figure1(config)
    assert "resuming: 2 finished run(s)" in capsys.readouterr().out
    assert made == [("relu", 0), ("relu", 1), ("tanh", 0), ("tanh", 1)]  # each run made once
    assert record["tanh_over_relu"] == 1.5 and len(record["runs"]) == 4
    assert not (tmp_path / "figure1.partial.json").exists() and (tmp_path / "figure1.json").is_file()
    # another config's partial runs are not reused
    (tmp_path / "figure1.partial.json").write_text(json.dumps({"config": {"seeds": [0]}, "runs": []}))
    figure1.run_figure1(config)
    assert "runs of another config, not reused" in capsys.readouterr().out and len(made) == 8
