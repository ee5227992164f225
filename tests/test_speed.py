"""Every fast path against the reference path: channels-last, bf16 autocast, torch.compile, TF32,
the compiled LRN kernel, Winograd convolutions, the fused columns on a GPU, and training runs with
the options on. Each "computes the same function" test compares both paths with the float64 ground
truth of tests/ground_truth.py, which says why its tolerance holds on any processor."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torchvision.models import alexnet

from replicate.kernels.winograd import conv_algorithm_unavailable_reason, use_winograd
from replicate.lrn import ResponseNorm
from replicate.model import AlexNet
from replicate.speed import (
    KEEP_FREED_MEMORY,
    SpeedConfig,
    begin_step,
    compiled,
    memory_format,
    set_precision,
    use_lrn_kernel,
)
from tests.conftest import HANG_GUARD_S, needs_mirror, write_image_tree
from tests.ground_truth import assert_same_function, errors_against_float64, relative
from tests.test_train import train

# The runs on compiled kernels evaluate with §4.1's ten crops alone: every batch shape is another
# build of every kernel, and the centre crop's shape would add a minute of a 2-core CPU.
TEN_CROP_ONLY = "train.final_views=[ten_crop]"
# The CPU's default fast paths (the compiled LRN, Winograd) built by torch.compile for one batch
# shape, 10 images (a training batch and one image's ten crops alike), under the settings in the
# compile cache's key that a run sets (fp32 matmuls, no deterministic algorithms). The tests that
# build them run one after another on one xdist worker, the later reusing the kernels the first
# built, instead of building them all at once on both: minutes of a 2-core CPU.
FAST_BATCH = 10
SAME_FAST_KERNELS = pytest.mark.xdist_group("cpu-fast-path-kernels")
FAST_KERNELS_RUN = [
    f"data.batch_size={FAST_BATCH}",
    "train.eval_batch_size=1",
    "train.deterministic=false",
    "train.max_steps=2",
    TEN_CROP_ONLY,
]


def ten_crop_evaluated(run) -> bool:
    path = run / "evaluation.json"
    return path.is_file() and list(json.loads(path.read_text())["views"]) == ["ten_crop"]


def pair(device="cpu", batch=4, **variant):
    torch.manual_seed(0)
    reference = AlexNet(10, fused=False, **variant).to(device)
    fast = AlexNet(10, fused=True, **variant).to(device)
    fast.load_state_dict(reference.state_dict())
    images = (torch.rand(batch, 3, 224, 224, device=device) * 255 - 128).requires_grad_(False)
    labels = torch.arange(batch, device=device) * 3 % 10
    return reference, fast, images, labels


def precision_errors(make, precision, images, labels, device="cuda"):
    """Relative error of the logits and of each parameter's gradient (sorted): the model on `device`
    at `precision` (fast path, channels-last) against the same model's float64 ground truth on the
    CPU, pooling as the fast path did (tests/ground_truth.py)."""
    torch.manual_seed(0)
    reference = make()
    with torch.no_grad():  # §5's init for both nets, so the comparison is like with like
        for module in reference.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.normal_(0, 0.01)
    fast = make().to(device)
    fast.load_state_dict(reference.state_dict())
    set_precision(precision)
    try:
        network = fast.to(memory_format=torch.channels_last)
        fast_images = images.to(device).contiguous(memory_format=torch.channels_last)
        errors = errors_against_float64(reference, fast, network, fast_images, labels.to(device), precision)
    finally:
        set_precision("fp32")
    return errors.logits, sorted(errors.grads.values())


def test_channels_last_computes_the_same_function():
    reference, fast, images, labels = pair()
    network = fast.to(memory_format=torch.channels_last)
    assert fast.columns[0].convs["conv2"][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_function(
        reference, fast, network, images.contiguous(memory_format=memory_format(True)), labels
    )


@pytest.mark.slow
def test_bf16_autocast_loses_no_more_than_torchvision_does():
    """bf16 operands keep 7 bits: at §5's init the worst gradient is off by ~0.1 relative for either
    net against its float64 truth pooling as bf16 did (measured 0.097, torchvision's 0.13: weight
    gradients sum many cancelling terms), so torchvision's loss is the yardstick."""
    _, _, images, labels = pair(dropout="off")
    ours = precision_errors(lambda: AlexNet(10, dropout="off", fused=True), "bf16", images, labels, "cpu")
    theirs = precision_errors(lambda: alexnet(num_classes=10, dropout=0.0), "bf16", images, labels, "cpu")
    assert 0 < ours[0] < 3 * theirs[0] + 1e-4, (ours[0], theirs[0])
    assert ours[1][len(ours[1]) // 2] < 3 * theirs[1][len(theirs[1]) // 2]
    assert ours[1][-1] < 3 * theirs[1][-1]
    # The LRN sums its squares in fp32 and hands back the autocast dtype.
    maps = torch.randn(2, 96, 5, 5, dtype=torch.bfloat16) * 30
    out = ResponseNorm()(maps, groups=2)
    assert out.dtype == torch.bfloat16
    exact = ResponseNorm()(maps.float(), groups=2)
    assert relative(out.float(), exact) < 1e-2


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # on a CPU: no CUDA graphs to replay
@pytest.mark.slow
def test_torch_compile_computes_the_same_function(mode):
    # Dropout off: compiled graphs draw their masks from another generator.
    reference, fast, images, labels = pair(dropout="off")
    network = compiled(fast, SpeedConfig(compile=True, compile_mode=mode))
    begin_step(mode)
    assert_same_function(reference, fast, network, images, labels)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.slow
def test_the_compiled_lrn_kernel_computes_the_same_function(fused):
    reference, fast, images, labels = pair(dropout="off")
    if not fused:
        fast = AlexNet(10, fused=False, dropout="off")
        fast.load_state_dict(reference.state_dict())
    use_lrn_kernel(fast, "compiled")
    assert_same_function(reference, fast, fast, images, labels)


@pytest.mark.slow
@SAME_FAST_KERNELS
def test_the_winograd_convolutions_compute_the_same_function():
    # speed.conv_algorithm=winograd: conv2-conv5 of both columns, transforms built by torch.compile;
    # with the compiled LRN, as a CPU runs by default
    set_precision("fp32")
    reference, _, images, labels = pair(batch=FAST_BATCH, dropout="off")
    fast = AlexNet(10, fused=False, dropout="off")
    fast.load_state_dict(reference.state_dict())
    use_lrn_kernel(fast, "compiled")
    assert use_winograd(fast) == [f"columns.{c}.convs.conv{i}.0" for c in (0, 1) for i in (2, 3, 4, 5)]
    assert list(fast.state_dict()) == list(reference.state_dict())  # checkpoints load either way
    for column in fast.columns:  # each ReLU after them moved into their output transforms
        for name in ("conv3", "conv4", "conv5"):
            block = column.convs[name]
            assert block[0].rectify and isinstance(block[1], torch.nn.Identity), name
        # conv2's went into the LRN after it (test_winograd_leaves_the_relu_that_the_compiled_lrn_took)
    # Winograd rounds otherwise than direct convolution (measured: <= 3e-5 of a gradient against the
    # float64 truth, direct convolution <= 3e-6): within TOLERANCE
    assert_same_function(reference, fast, fast, images, labels)


def test_winograd_leaves_the_relu_that_the_compiled_lrn_took():
    model = AlexNet(10)
    use_lrn_kernel(model, "compiled")
    use_winograd(model)
    for column in model.columns:
        assert not column.convs["conv2"][0].rectify and column.convs["conv2"][2].rectify  # the LRN's
        assert all(column.convs[name][0].rectify for name in ("conv3", "conv4", "conv5"))


@pytest.mark.slow
def test_winograd_is_refused_where_it_would_not_run(tmp_path):
    assert "runs on the CPU only, not on cuda:0" in conv_algorithm_unavailable_reason(
        "winograd", [torch.device("cpu"), torch.device("cuda:0")]
    )
    assert conv_algorithm_unavailable_reason("direct", [torch.device("cuda:0")]) is None
    for other in ("speed.compile=true", "speed.fused_columns=true"):
        code, _, err = train(tmp_path, "speed.conv_algorithm=winograd", other)
        assert code != 0 and "conv_algorithm=winograd needs compile=false and fused_columns=false" in err
        assert "Traceback" not in err


@pytest.mark.parametrize("variant", [{}, {"lrn1_before_relu": True}])
def test_the_compiled_lrn_kernel_takes_in_the_relu_before_it_and_gives_it_back(variant):
    model = AlexNet(10, **variant)
    built = repr(model)
    use_lrn_kernel(model, "compiled")
    for column in model.columns:
        for name, block in column.convs.items():
            norms = [m for m in block if isinstance(m, ResponseNorm)]
            # §3.5's order (conv, ReLU, LRN) fuses; #145's conv1 (conv, LRN, pool, ReLU) has no ReLU to take
            fused = name == "conv2" or (name == "conv1" and not variant)
            assert [n.rectify for n in norms] == ([True] if fused else [False] * len(norms)), name
            assert isinstance(block[1], torch.nn.Identity) == fused, name
    use_lrn_kernel(model, "torch")
    assert repr(model) == built


def test_precision_flags():
    try:
        set_precision("tf32")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        set_precision("fp32")  # also turns off cuDNN's TF32, which PyTorch enables by default
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        set_precision("fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_gpu_paths_against_the_cpu_reference(precision):
    """Fused columns and channels-last on the GPU in each precision, against the float64 ground truth
    on the CPU pooling as the GPU did (tests/ground_truth.py), with torchvision's alexnet under the
    same conditions as the yardstick.

    Measured on an H100 against the fp32 CPU net: every op agrees to ~1e-6 (LRN forward and backward
    9e-8, conv1's weight gradient 9e-7, max-pool backward exact) but for the pooling windows whose
    winner the devices pick differently, which moved conv1's and conv2's gradients by up to ~2e-2;
    the ground truth here pools as the GPU did, so the fp32 bounds below (those measurements') hold
    with room. TF32 (10-bit operands) and bf16 (7-bit) add their rounding, for torchvision's net as
    for this one (conv1's gradient: 6e-2 and 0.26 for torchvision)."""
    _, images, labels = pair(dropout="off")[1:]
    ours = precision_errors(lambda: AlexNet(10, dropout="off", fused=True), precision, images, labels)
    theirs = precision_errors(lambda: alexnet(num_classes=10, dropout=0.0), precision, images, labels)
    (logits, errors), (tv_logits, tv_errors) = ours, theirs
    if precision == "fp32":
        # measured against the fp32 CPU net: logits 4e-7; gradients median 7e-4, worst ~2e-2
        assert logits < 1e-5 and errors[len(errors) // 2] < 5e-3 and errors[-1] < 5e-2, errors
    else:  # no worse than torchvision's own loss of precision, within 3x
        assert logits < 3 * tv_logits + 1e-4, (logits, tv_logits)
        assert errors[len(errors) // 2] < 3 * tv_errors[len(tv_errors) // 2], (errors, tv_errors)
        assert errors[-1] < 3 * tv_errors[-1], (errors, tv_errors)


@pytest.mark.slow
@needs_mirror
def test_a_run_with_every_speed_option_trains_and_evaluates(tmp_path):
    code, out, err = train(
        tmp_path,
        *FAST_KERNELS_RUN,  # one batch shape in training and in evaluation: each kernel built once
        "train.deterministic=true",  # as the TINY runs (FAST_KERNELS_RUN's false is for the shared cache)
        "speed.precision=bf16",
        "speed.channels_last=true",
        "speed.fused_columns=true",
        "speed.lrn_kernel=compiled",
    )
    assert code == 0, err
    run = tmp_path / "baseline" / "seed0"
    assert ten_crop_evaluated(run) and (run / "checkpoints" / "last.pt").is_file()
    code, _, err = train(tmp_path / "bad", "speed.precision=fp16")
    assert code != 0 and "precision" in err and "fp16" in err


@pytest.mark.slow  # probes torch.compile
def test_auto_takes_the_fastest_path_that_can_run_on_each_device():
    cpu, gpu = [torch.device("cpu")], [torch.device("cuda:0")]
    said = []
    fast = SpeedConfig().resolved(cpu, said.append)
    assert (fast.lrn_kernel, fast.conv_algorithm) == ("compiled", "winograd") and not said
    # torch.compile fuses the torch LRN itself, and Winograd joins neither it nor the fused columns
    compiled_net = SpeedConfig(compile=True).resolved(cpu)
    assert (compiled_net.lrn_kernel, compiled_net.conv_algorithm) == ("torch", "direct")
    fused = SpeedConfig(fused_columns=True).resolved(cpu)
    assert (fused.lrn_kernel, fused.conv_algorithm) == ("compiled", "direct")
    on_gpu = SpeedConfig().resolved(gpu)  # no probe runs: nothing here needs the GPU
    assert (on_gpu.lrn_kernel, on_gpu.conv_algorithm) == ("torch", "direct")
    chosen = SpeedConfig(lrn_kernel="torch", conv_algorithm="direct")
    assert chosen.resolved(cpu) is chosen


@pytest.mark.slow
@needs_mirror
@SAME_FAST_KERNELS
def test_a_run_with_the_default_speed_options_trains_on_the_fast_cpu_paths(tmp_path):
    code, out, err = train(tmp_path, *FAST_KERNELS_RUN, fast_paths=True)
    assert code == 0, err
    run = tmp_path / "baseline" / "seed0"
    assert ten_crop_evaluated(run) and (run / "checkpoints" / "last.pt").is_file()
    chosen = "lrn_kernel compiled; conv_algorithm winograd"
    assert f"speed: precision fp32; channels_last False; compile False; {chosen}" in out
    assert chosen in json.loads((run / "environment.json").read_text())["speed"]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "options",
    [
        ["speed.precision=fp32", "data.augment_on=device"],
        ["data.store_format=jpeg", "data.augment_on=device", "data.decode_on=device"],  # nvjpeg
        ["speed.precision=bf16", "speed.channels_last=true", "speed.compile=true"],
        ["speed.precision=tf32", "speed.compile=true", "speed.compile_mode=reduce-overhead"],  # CUDA graphs
        ["speed.lrn_kernel=triton", "speed.fused_columns=true"],
        ["speed.lrn_kernel=compiled"],  # Inductor's Triton kernels
    ],
)
def test_a_gpu_training_run_with_speed_options(tmp_path, options):
    """The training loop on the GPU (autocast, layout, fused columns) on a generated ImageFolder."""
    classes = {f"n{i:08d}": 4 for i in range(10)}
    write_image_tree(tmp_path / "data", "train", classes, size=(300, 260))
    write_image_tree(tmp_path / "data", "val", dict.fromkeys(classes, 2), size=(300, 260), seed=1)
    code, _, err = train(
        tmp_path / "runs",
        "data.dataset=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "train.device=cuda",
        "train.deterministic=false",
        "train.max_steps=3",
        *options,
    )
    assert code == 0, err
    evaluation = json.loads((tmp_path / "runs" / "baseline" / "seed0" / "evaluation.json").read_text())
    assert evaluation["views"]["ten_crop"]["images"] == 20


@pytest.mark.gpu
def test_views_cut_on_the_gpu_equal_the_views_cut_on_the_cpu():
    from replicate.data.transforms import Augment, AugmentConfig
    from tests.test_data_transforms import random_images_and_stats

    images, stats = random_images_and_stats(16)
    for config in (AugmentConfig(), AugmentConfig(mean_crop="centre", colour_noise="code2012", crop_chunk=4)):
        augment = Augment(config, stats, seed=1)
        plan = augment.plan([(0, p) for p in range(16)])
        torch.testing.assert_close(
            augment.apply_plan(images.cuda(), plan).cpu(), augment.apply_plan(images, plan)
        )


FAULTS_PER_STEP = """
import sys, torch
from replicate.speed import keep_freed_memory, page_faults
print(keep_freed_memory())
x = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
faults = []
for _ in range(10):  # a "step": temporaries as large as an LRN layer's, freed at its end
    before = page_faults()
    a = x * 2; b = a + x; c = (b * a).relu(); del a, b, c
    faults.append(page_faults() - before)
print(sum(faults[5:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
@pytest.mark.slow
def test_kept_freed_memory_is_reused_without_new_page_faults():
    def steady_faults(keep: str) -> tuple[str, int]:
        env = {**os.environ, KEEP_FREED_MEMORY: keep}
        done = subprocess.run(
            [sys.executable, "-c", FAULTS_PER_STEP], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        kept, faults = done.stdout.split()
        return kept, int(faults)

    kept, faults_kept = steady_faults("1")
    handed_back, faults_default = steady_faults("0")
    assert (kept, handed_back) == ("True", "False")
    # glibc's default maps and zeroes every 64 MiB block anew: 16,384 pages each, 3 per step
    assert faults_default > 5 * 3 * 16_000
    assert faults_kept < faults_default / 4


@pytest.mark.slow
@needs_mirror
def test_the_compiled_kernels_without_a_compiler_are_a_clear_error(tmp_path):
    """Where torch.compile cannot build the LRN's kernels or Winograd's transforms (here: no C++
    compiler, and a cache of its own so that no earlier build is reused), `bench`, `bench-winograd`
    and `train` stop before their first step, saying so."""
    env = {"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "replicate",
            "bench",
            "--lrn-kernel",
            "compiled",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, **env},
    )
    reason = "torch.compile could not build the LRN's kernels on cpu (InvalidCxxCompiler: No working C++"
    assert bench.returncode == 2 and f"--lrn-kernel compiled: {reason}" in bench.stderr, bench.stderr
    assert "Traceback" not in bench.stderr and not (tmp_path / "b.json").exists()
    code, _, err = train(tmp_path / "runs", "speed.lrn_kernel=compiled", env=env)
    assert code != 0 and f"speed.lrn_kernel=compiled: {reason}" in err and "Traceback" not in err, err
    assert "set speed.lrn_kernel=torch" in err
    assert not list((tmp_path / "runs").rglob("*.pt"))  # no step was taken
    # Winograd's transforms are built by torch.compile too: bench, bench-winograd and train
    reason = "torch.compile could not build its transforms (InvalidCxxCompiler: No working C++"
    for command in (["bench", "--conv-algorithm", "winograd"], ["bench-winograd"]):
        probe = subprocess.run(
            [sys.executable, "-m", "replicate", *command, "--json", str(tmp_path / "w.json")],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
            env={**os.environ, **env},
        )
        assert probe.returncode == 2 and reason in probe.stderr, (command, probe.stderr)
        assert "Traceback" not in probe.stderr and not (tmp_path / "w.json").exists()
    code, _, err = train(tmp_path / "runs", "speed.conv_algorithm=winograd", env=env)
    assert code != 0 and f"speed.conv_algorithm=winograd: {reason}" in err and "Traceback" not in err, err
    assert "set speed.conv_algorithm=direct" in err and not list((tmp_path / "runs").rglob("*.pt"))
    # by default (auto) a run takes the plain paths instead, saying so in one line
    code, out, err = train(tmp_path / "auto", "train.max_steps=1", env=env, fast_paths=True)
    assert code == 0, err
    fallback = [line for line in out.splitlines() if line.startswith("speed: the LRN as torch ops")]
    assert len(fallback) == 1 and "direct convolutions (Winograd: torch.compile could not" in fallback[0], out
    assert (
        "speed: precision fp32; channels_last False; compile False; lrn_kernel torch; conv_algorithm direct\n"
        in out
    )
