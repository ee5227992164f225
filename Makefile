# The table of contents of this repository: `make <target>`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Rebuilt when missing or older than pyproject.toml (the dependency list).
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast test-gpu lint replicate ablations figure1 prepare bench bench-data bench-gpu gpu-evidence lrn-cifar report clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# pytest-xdist's worker processes for `make test` (0: none, in this process). Two suit a 2-core CPU:
# much of the suite's time is one core compiling or waiting on a subprocess. Each worker, and every run
# it starts, takes its share of the cores' threads (tests/conftest.py). loadgroup: the tests of one
# xdist_group run on one worker, in order (tests/test_speed.py's, which share compiled kernels).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

# Every test (CI runs this).
test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The unit tests only, for the edit-test loop: no test marked slow (end-to-end runs, notebooks).
test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# The modules whose tests need a GPU (skipped without one), with every skip's reason printed, and the
# CIFAR-10 ones, whose runs take the GPU when there is one (device: auto).
test-gpu: $(STAMP)
	$(PY) -m pytest -rs tests/test_lrn.py tests/kernels/test_lrn_triton.py tests/test_speed.py tests/test_model.py tests/test_data_store.py tests/test_evaluate.py tests/cifar

lint: $(STAMP)
	$(PY) -m ruff check replicate analysis tests
	$(PY) -m ruff format --check replicate analysis tests

# The run `make replicate` trains: experiments/replicate-bundled.yaml, or baseline.yaml with DATA=.
REPLICATE_RUN = runs/$(if $(DATA),baseline,replicate-bundled)/seed0

replicate: $(STAMP)
	$(PY) -m replicate replicate $(if $(DATA),data.root=$(DATA))
	$(PY) -m analysis.summary $(REPLICATE_RUN)

# The paper's ablations, 3 seeds each (the baseline 5): the bundled preset, or DATA=/path/to/ILSVRC2012
# for the full one. Runs (checkpoints: ~15 GB for the bundled sweep) go to RUNS, outside the checkout;
# each finished run's small records to analysis/results/ablations-<preset>/, from which the sweep
# continues, here or on another machine.
RUNS ?= $(abspath ..)/alexnet-2012-runs
ablations: $(STAMP)
	$(PY) -m replicate ablate $(if $(DATA),--preset full data.root=$(DATA),--preset bundled) \
		train.runs_dir=$(RUNS)

# Figure 1 (§3.1): ReLU vs tanh epochs to 25% CIFAR-10 training error; PRESET=full for all 50,000 images.
figure1: $(STAMP)
	$(PY) -m replicate figure1 experiments/cifar10/figure1$(if $(filter full,$(PRESET)),-full).yaml

# §3.3 on CIFAR-10: the four-layer net with and without response normalisation (test error).
lrn-cifar: $(STAMP)
	$(PY) -m replicate lrn-cifar experiments/cifar10/lrn.yaml

# Tables (reports/tables) and figures (reports/figures) from the runs on disk: executes the notebooks.
report: $(STAMP)
	$(PY) -m analysis.report

# Preprocess the data once (§2): the bundled Imagenette subset, or DATA=/path/to/ILSVRC2012.
prepare: $(STAMP)
	$(PY) -m replicate prepare experiments/baseline.yaml $(if $(DATA),data.root=$(DATA) data.dataset=ilsvrc2012)

# The network's training and 10-crop images/s against torchvision's alexnet (BENCHMARKS.md): every
# default (on the CPU the LRN as kernels fused by torch.compile and conv2-conv5 by Winograd); the plain
# torch ops (speed.lrn_kernel=torch, speed.conv_algorithm=direct); the compiled LRN alone; then
# Winograd against direct convolution layer by layer.
bench: $(STAMP)
	$(PY) -m replicate bench
	$(PY) -m replicate bench --lrn-kernel torch --conv-algorithm direct
	$(PY) -m replicate bench --lrn-kernel compiled --conv-algorithm direct
	$(PY) -m replicate bench-winograd

# Data pipeline images/s against a plain torchvision pipeline (BENCHMARKS.md).
bench-data: $(STAMP)
	$(PY) -m replicate bench-data

# On a GPU machine: the network in fp32 and under the fastest options (the Triton LRN, the compiled
# LRN and CUDA graphs each measured on their own), the input pipeline with all
# cores and GPU JPEG decoding, then the 90-epoch projection (BENCHMARKS.md; the H100 records of
# analysis/benchmarks/h100 came from these commands).
BENCH_OUT ?= reports/bench
bench-gpu: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) -m replicate bench --steps 10 --precision fp32 --profile --json $(BENCH_OUT)/fp32.json
	$(PY) -m replicate bench --steps 10 --precision tf32 --compile --json $(BENCH_OUT)/tf32-compile.json
	$(PY) -m replicate bench --steps 10 --precision bf16 --channels-last --compile --json $(BENCH_OUT)/bf16-cl-compile.json
	$(PY) -m replicate bench --steps 10 --precision fp32 --lrn-kernel triton --profile --json $(BENCH_OUT)/fp32-triton-lrn.json
	$(PY) -m replicate bench --steps 10 --precision fp32 --lrn-kernel compiled --json $(BENCH_OUT)/fp32-compiled-lrn.json
	$(PY) -m replicate bench --steps 10 --precision tf32 --compile reduce-overhead --json $(BENCH_OUT)/tf32-compile-cudagraphs.json
	$(PY) -m replicate bench-data --workers $(shell nproc) --batch-size 128 --steady 25 --repeats 3 --json $(BENCH_OUT)/data.json
	$(PY) -m replicate project $(BENCH_OUT)/fp32.json $(BENCH_OUT)/tf32-compile.json \
		$(BENCH_OUT)/bf16-cl-compile.json --data $(BENCH_OUT)/data.json --contender "replicate (per-column)" \
		--pipeline steady_raw_device

# On one GPU (its projected time printed first): the GPU tests, the headline bench lines, the bundled
# ablation sweep (--preset gpu: the baseline's 5 seeds, each ablation's 3) and the report, all under
# OUT, packed (checkpoints left out) into OUT/evidence-records.tar.gz (replicate/gpu_evidence.py).
# STEPS=sweep,report: only those; MINUTES=9: stop in time for the report, the same command again
# resumes. SMOKE=1: every step at toy size, on any CPU (CI runs it).
OUT ?= reports/gpu-evidence
gpu-evidence: $(STAMP)
	$(PY) -m replicate gpu-evidence $(OUT) $(if $(SMOKE),--smoke) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(MINUTES),--minutes $(MINUTES))

clean-venv:
	rm -rf $(VENV)
