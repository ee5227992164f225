from pathlib import Path
from typing import Annotated, get_args, get_origin, get_type_hints

import pytest
import torch

from replicate.config import ConfigError, Range, Section, parse_override
from replicate.devices import choose
from replicate.experiment import ExperimentConfig, load_experiment
from replicate.model import AlexNet, ModelConfig

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_baseline_is_the_defaults():
    assert load_experiment(EXPERIMENTS / "baseline.yaml") == ExperimentConfig()


def test_overrides_are_typed_and_nested():
    config = load_experiment(
        EXPERIMENTS / "baseline.yaml",
        ["model.lrn=off", "model.columns=1", "model.lrn_k=1", "name=x"],
    )
    assert config.model == ModelConfig(lrn="off", columns=1, lrn_k=1.0)
    assert isinstance(config.model.lrn_k, float) and config.name == "x"
    assert AlexNet.from_config(config.model).config == config.model


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.colums=1"], "unknown config key 'model.colums'"),
        (["modle.lrn=off"], "unknown config key 'modle'"),
        (["model.lrn=of"], r"model.lrn = 'of' is not one of \['paper', 'code2012', 'off'\]"),
        (["model.num_classes=ten"], "model.num_classes: expected int, got 'ten'"),
        (["model.dropout_p=2"], r"model.dropout_p = 2.0 must be in \[0, 1\)"),
        (["optim.momentum=1.5"], r"optim.momentum = 1.5 must be in \[0, 1\)"),
        (["optim.weight_decay=-1"], "optim.weight_decay = -1.0 must be >= 0"),
        (["optim.lr=0"], "optim.lr = 0.0 must be > 0"),
        (["data.batch_size=0"], "data.batch_size = 0 must be >= 1"),
        (["data.workers=-1"], "data.workers = -1 must be >= 0"),
        (["data.augment.crop_size=300"], "crop_size = 300 is larger than image_side = 256"),
        (["train.epochs=0"], "train.epochs = 0 must be >= 1"),
        (["model.input_size=227"], "data.augment.crop_size = 224 but model.input_size = 227"),
        (["model.lrn"], "not of the form key=value"),
        (["model=3"], "model: expected a mapping"),
        (["train.final_views=[centre, tencrop]"], "final_views: 'tencrop' is not one of"),
        (["data.augment.colour_noise=pca"], "data.augment.colour_noise = 'pca' is not one of"),
        (["optim.patience=0"], "optim.patience = 0 must be >= 1"),
        (["optim.lr=[1"], r"override 'optim.lr=\[1': its value is not valid YAML"),
        (["name=../../x"], "name = '../../x': it names a folder inside train.runs_dir"),
        (["name=.."], "name = '..': it names a folder inside train.runs_dir"),
        (["train.device=gpu"], "train.device: 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
        (
            ["train.model_parallel=true", "train.device=cpu"],
            "train.model_parallel .* needs device=auto, not cpu",
        ),
    ],
)
def test_bad_keys_and_values_name_the_key_and_file(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_experiment(EXPERIMENTS / "baseline.yaml", overrides)
    assert "baseline.yaml" in str(error.value)


def test_variant_files_name_a_base_and_change_only_their_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nmodel:\n  num_classes: 10\n  lrn: paper\n")
    (tmp_path / "no_lrn.yaml").write_text("base: base.yaml\nname: no_lrn\nmodel:\n  lrn: off\n")
    config = load_experiment(tmp_path / "no_lrn.yaml")
    assert config.name == "no_lrn" and config.model == ModelConfig(num_classes=10, lrn="off")


def test_base_cycle_and_missing_and_malformed_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_experiment(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_experiment(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_experiment(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of config keys"):
        load_experiment(tmp_path / "list.yaml")
    (tmp_path / "bases.yaml").write_text("base: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bases.yaml: base: \[1, 2\] should name one file"):
        load_experiment(tmp_path / "bases.yaml")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not a UTF-8 text file"):
        load_experiment(tmp_path / "latin1.yaml")


def test_override_values_are_read_as_yaml():
    assert parse_override("model.lrn_k=1e-1") == (["model", "lrn_k"], 0.1)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("name=") == (["name"], "")


def test_model_parallel_without_two_gpus_is_an_error_not_ignored(monkeypatch):
    """A machine without two GPUs per process cannot place the columns: an error, not one device."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"model_parallel needs 2 GPUs per process; 1 visible"):
        choose("auto", True, local_rank=0)


def test_train_device_cuda_gives_each_torchrun_process_its_own_gpu(monkeypatch):
    """`cuda` with no index is the GPU of the process's local rank, as `auto` picks it; `cuda:N` is N."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose("auto", False, local_rank=1) == [torch.device("cuda", 1)]  # device=auto
    assert choose("cuda", False, local_rank=1) == [torch.device("cuda", 1)]
    assert choose("cuda:0", False, local_rank=1) == [torch.device("cuda", 0)]
    with pytest.raises(ConfigError, match="local rank 2: only 2 CUDA device"):
        choose("cuda", False, local_rank=2)
    with pytest.raises(ConfigError, match="train.device=cuda:2: only 2 CUDA device"):
        choose("cuda:2", False, local_rank=0)


def test_every_numeric_config_field_declares_its_range():
    """A number in a config means something only within a range: each int or float field says which
    (`config.Range`), so that `optim.momentum=1.5` is an error naming the key, not a diverging run."""
    import replicate.cifar.figure1
    import replicate.cifar.lrn  # noqa: F401  (their sections)

    def sections(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from sections(sub)

    missing = []
    for section in sections(Section):
        for name, hint in get_type_hints(section, include_extras=True).items():
            numeric = (
                get_origin(hint) is Annotated and get_args(hint)[0] in (int, float) or hint in (int, float)
            )
            if numeric and not any(isinstance(m, Range) for m in getattr(hint, "__metadata__", ())):
                missing.append(f"{section.__name__}.{name}")
    assert not missing, missing
    assert len(list(sections(Section))) >= 10
