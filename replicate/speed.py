"""How the network runs: one config section (`speed`) and the one function that builds the network
from it (`build_network`), for training, evaluation and the benchmarks alike.

The paper trained in fp32 (§5; the 2012 code had nothing else), so `precision: fp32` is the default
and means fp32 everywhere, convolutions too: PyTorch lets cuDNN use TF32 by default on Ampere and
later GPUs, which `fp32` turns off. `tf32` allows it for convolutions and matrix products; `bf16`
runs them under bf16 autocast (weights, optimiser and LRN stay fp32). `channels_last`, `compile`
(with `compile_mode: reduce-overhead`, CUDA graphs as well), `fused_columns` and the LRN kernels
(replicate/kernels/) leave the arithmetic as it is up to summation order; `conv_algorithm: winograd`
rounds the same convolution differently (paper/fidelity.md). Tests hold each equal to the reference
path within its tolerance (tests/test_speed.py).

By default (`auto`) each device takes the fastest of these paths measured (BENCHMARKS.md): on the CPU
the compiled LRN and Winograd's conv2-conv5, about 1.5x the plain torch ops; on a GPU the torch LRN
and cuDNN's own choice of algorithm. Where a path's requirement is missing (a C++ compiler for
torch.compile) the run says so in one line and takes the plain one (`SpeedConfig.resolved`).

One setting is about the process, not the network: `keep_freed_memory`, on for every
`python -m replicate` command (BENCHMARKS.md measures it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from replicate.config import ConfigError, Section
from replicate.kernels.lrn_compiled import compiled_response_norm, compiled_unavailable_reason
from replicate.kernels.lrn_triton import setting_conflict, triton_response_norm, unavailable_reason
from replicate.kernels.winograd import ConvAlgorithm, conv_algorithm_unavailable_reason, use_winograd
from replicate.lrn import ResponseNorm
from replicate.model import AlexNet, ModelConfig

try:
    import resource
except ImportError:  # Windows
    resource = None

Precision = Literal["fp32", "tf32", "bf16"]
# torch.compile's modes; reduce-overhead also replays each step as a CUDA graph (one launch for the
# step's hundreds of kernels). max-autotune would time kernel variants at every start: not offered.
CompileMode = Literal["default", "reduce-overhead"]
# torch: the reference autograd function; compiled: kernels fused by torch.compile (CPU needs a C++
# compiler); triton: two hand-written Triton kernels (CUDA, NCHW, outside torch.compile); auto:
# compiled on the CPU where it can be built, else torch (`SpeedConfig.resolved`).
LRNKernel = Literal["auto", "torch", "compiled", "triton"]
AUTO = "auto"
LRN_FAST_PATHS = {"compiled": compiled_response_norm, "triton": triton_response_norm}


@dataclass
class SpeedConfig(Section):
    """How the network runs; every option but `precision` computes the paper's fp32 function (Winograd
    rounds it differently: paper/fidelity.md)."""

    precision: Precision = "fp32"  # fp32 | tf32 | bf16 (autocast); fp32 is the paper's arithmetic
    channels_last: bool = False  # NHWC memory layout for the convolutions
    compile: bool = False  # torch.compile the network
    compile_mode: CompileMode = "default"  # reduce-overhead: CUDA graphs too (needs compile=true)
    fused_columns: bool = False  # both columns in one tensor (grouped convs): faster only compiled
    lrn_kernel: LRNKernel = AUTO  # auto | torch | compiled | triton (replicate/kernels/)
    conv_algorithm: ConvAlgorithm = AUTO  # auto | direct | winograd: conv2-conv5 by Winograd's (CPU)

    def __post_init__(self) -> None:
        super().__post_init__()  # Literal choices
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode={self.compile_mode} needs compile=true")
        conflict = setting_conflict(self.compile, self.channels_last)
        if self.lrn_kernel == "triton" and conflict:
            raise ConfigError(f"lrn_kernel=triton {conflict}, or lrn_kernel=torch")
        if self.conv_algorithm == "winograd" and (self.compile or self.fused_columns):
            # its transforms are compiled on their own; the fused path calls F.conv2d itself
            raise ConfigError(
                "conv_algorithm=winograd needs compile=false and fused_columns=false, "
                "or conv_algorithm=direct"
            )

    def resolved(self, devices: Sequence[torch.device], say: Callable[[str], None] = print) -> SpeedConfig:
        """These options with every `auto` made concrete for `devices`: the fastest path measured that
        can run there. On the CPU: the compiled LRN (torch's LRN under compile=true, which fuses it
        itself) and Winograd (direct under compile or fused_columns, which it cannot join); on a GPU:
        the torch LRN and cuDNN's algorithms (the Triton LRN is not yet measured faster there). Where
        torch.compile cannot build a kernel, `say` gets one line naming the reason and the plain path
        taken (the probe tries the compiler on a few numbers)."""
        if AUTO not in (self.lrn_kernel, self.conv_algorithm):
            return self
        cpu = all(device.type == "cpu" for device in devices)
        lrn = conv = None
        fallbacks = []
        if self.lrn_kernel == AUTO:
            lrn = "compiled" if cpu and not self.compile else "torch"
            why = compiled_unavailable_reason(list(devices)) if lrn == "compiled" else None
            if why:
                lrn = "torch"
                fallbacks.append(f"the LRN as torch ops ({why})")
        if self.conv_algorithm == AUTO:
            conv = "winograd" if cpu and not (self.compile or self.fused_columns) else "direct"
            why = conv_algorithm_unavailable_reason(conv, list(devices))
            if why:
                conv = "direct"
                fallbacks.append(f"direct convolutions (Winograd: {why})")
        if fallbacks:
            say(f"speed: {'; '.join(fallbacks)}; the same function, slower")
        return replace(self, lrn_kernel=lrn or self.lrn_kernel, conv_algorithm=conv or self.conv_algorithm)

    def unavailable_reason(self, devices: Sequence[torch.device], flags: bool = False) -> str | None:
        """Why this machine cannot run these options on `devices` (a kernel without its compiler or
        its GPU), naming the option as a config key (`speed.lrn_kernel=compiled`) or, with `flags`, as
        a command-line flag (`--lrn-kernel compiled`); None if it can. Probes the compilers once."""

        def named(option: str, value: str) -> str:
            return f"--{option.replace('_', '-')} {value}" if flags else f"speed.{option}={value}"

        if self.lrn_kernel == "compiled":
            why = compiled_unavailable_reason(list(devices))
        elif self.lrn_kernel == "triton":
            why = unavailable_reason(list(devices))
        else:
            why = None
        if why:
            return f"{named('lrn_kernel', self.lrn_kernel)}: {why}; set {named('lrn_kernel', 'torch')}"
        why = conv_algorithm_unavailable_reason(self.conv_algorithm, list(devices))
        if why:
            return (
                f"{named('conv_algorithm', self.conv_algorithm)}: {why}; "
                f"set {named('conv_algorithm', 'direct')}"
            )
        return None

    def __str__(self) -> str:
        text = f"precision {self.precision}; channels_last {self.channels_last}; compile {self.compile}"
        if self.compile_mode != "default":
            text += f" ({self.compile_mode})"
        text += "; fused_columns True" if self.fused_columns else ""
        return text + f"; lrn_kernel {self.lrn_kernel}; conv_algorithm {self.conv_algorithm}"


KEEP_FREED_MEMORY = "ALEXNET_KEEP_FREED_MEMORY"  # set to 0 to leave the C library's allocator as it is
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's <malloc.h>


@functools.cache
def _libc(name: str):
    """The C library's function `name` (opened once), or None where there is none (macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):  # no such function, or no C library to open by None
        return None


def keep_freed_memory() -> bool:
    """Make the C library's malloc keep freed memory for reuse instead of handing it back to the kernel.

    PyTorch's CPU tensors come straight from malloc. glibc serves every block above its mmap threshold
    (32 MiB at most) with a fresh mmap and unmaps it when freed, so every large activation of every
    training step is new memory that the kernel maps and zeroes page by page on first touch, a large
    part of a CPU training step on a small machine. With mmap and trimming off, freed blocks return
    to the heap and the next step reuses them. The price: the process holds on to its peak memory
    until it exits. `ALEXNET_KEEP_FREED_MEMORY=0` turns it off;
    it does nothing where the C library has no `mallopt` (macOS, Windows). Returns whether it is on.
    """
    mallopt = _libc("mallopt")
    if os.environ.get(KEEP_FREED_MEMORY, "1") == "0" or mallopt is None:
        return False
    # mallopt returns 1 on success; both must hold, or some blocks would still be unmapped
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (malloc_trim): before a process forks loader
    workers, and in each worker after each batch. A child inherits the heap that `keep_freed_memory`
    kept, free lists included: its allocations reuse those blocks, copying each page they touch from
    the parent, and it keeps what it frees, so every worker would grow towards the parent's peak
    (the bundled run's trainer, its loader workers and two 10-crop evaluation workers would need
    over 24 GB). Trimmed pages are fresh zero pages to a child, and a worker that trims after each
    batch holds about one batch. Does nothing without glibc's malloc_trim."""
    malloc_trim = _libc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def default_freed_memory() -> None:
    """Undo `keep_freed_memory` in this process (a loader worker, which inherits the setting): large
    blocks mmapped and unmapped when freed, as the C library does by default, so that a worker's
    batches do not pile up in its heap."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return
    mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
    mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def page_faults() -> int:
    """Minor page faults of this process so far (pages mapped on first touch), the cost that
    `keep_freed_memory` saves; 0 where the platform does not count them (Windows has no `resource`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def allocator_note(kept: bool) -> str:
    return (
        "freed memory kept for reuse"
        if kept
        else f"malloc as the C library sets it ({KEEP_FREED_MEMORY}=0 or no mallopt)"
    )


def set_precision(precision: Precision) -> None:
    """TF32 on for `tf32` only; `fp32` turns off cuDNN's default TF32 convolutions."""
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast for `bf16`, nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def begin_step(compile_mode: CompileMode) -> None:
    """Before each training forward under CUDA graphs: the previous step's outputs may be overwritten
    (torch.compiler.cudagraph_mark_step_begin)."""
    if compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def use_lrn_kernel(model: nn.Module, kernel: LRNKernel) -> None:
    """Every `ResponseNorm` of `model` (or `model` itself) runs on `kernel`.

    Under "compiled", a ReLU right before an LRN (§3.5's order, in an `nn.Sequential`) moves into the
    LRN's kernels, which saves a pass over the maps each way: the ReLU's place holds an
    `nn.Identity` and the LRN rectifies its input itself. Any other kernel puts the ReLU back.
    """
    for module in list(model.modules()):  # a list: the loop swaps modules
        if isinstance(module, ResponseNorm):
            module.kernel, module.fast_path = kernel, LRN_FAST_PATHS.get(kernel)
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            before, norm = module[index], module[index + 1]
            if not isinstance(norm, ResponseNorm):
                continue
            if kernel == "compiled" and isinstance(before, nn.ReLU):
                module[index], norm.rectify = nn.Identity(), True
            elif kernel != "compiled" and norm.rectify:
                module[index], norm.rectify = nn.ReLU(), False


def apply_speed(model: AlexNet, speed: SpeedConfig) -> AlexNet:
    """`model` (built, placed) with the kernels and layout of `speed` (no `auto` left), in place;
    `model.speed` keeps the options."""
    model.speed, model.fused = speed, speed.fused_columns
    use_lrn_kernel(model, speed.lrn_kernel)
    if speed.conv_algorithm == "winograd":
        use_winograd(model)
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_network(model: ModelConfig, speed: SpeedConfig, devices: Sequence[torch.device]) -> AlexNet:
    """The network of `model`, initialised from the global RNG, on `devices` (two: one column on each,
    §3.2) with the kernels and layout of `speed`, and the process's precision set to `speed.precision`.
    `auto` options as `SpeedConfig.resolved` makes them. A ConfigError naming the option if this
    machine cannot run it. Not compiled: `compiled`."""
    network = AlexNet.from_config(model, list(devices) if len(devices) > 1 else None)
    if len(devices) == 1:
        network.to(devices[0])
    speed = speed.resolved(devices)  # after the weights' draws, as every compiler probe below
    why_not = speed.unavailable_reason(devices)
    if why_not:
        raise ConfigError(why_not)
    set_precision(speed.precision)
    return apply_speed(network, speed)


def compiled(module: nn.Module, speed: SpeedConfig) -> nn.Module:
    """`module` wrapped by torch.compile if `speed.compile`; the wrapper shares the parameters, so
    checkpoints are still written from `module`."""
    return torch.compile(module, mode=speed.compile_mode) if speed.compile else module
