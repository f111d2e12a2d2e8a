# Each target sets up .venv itself on first use: torch pinned first (a bare `torch` pulls a CUDA build).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: emulate test test-slow lint format bench bench-sweep accuracy clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m replayer.native  # builds the CUDA device guard for a CPU-only torch (install time, ~2 s)
	touch $(STAMP)

emulate: $(STAMP)  ## the main job on the embedded default (hf-cb, Llama-3.1-8B, virtual H100)
	$(VENV)/bin/revati emulate

test: $(STAMP)  ## lint + the default test suite (no GPU needed)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)  ## the slow-marked tests
	$(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: $(STAMP)  ## speed benchmarks (ratios taken in one run)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/recorder_overhead.py
	$(PY) benchmarks/fit_speed.py
	$(PY) benchmarks/cross_hardware.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/tp_scaling.py
	$(PY) benchmarks/sweep.py --tiny-only

bench-sweep: $(STAMP)  ## sweep throughput, local vs Ray, and a 48-point Llama-3.1-8B sweep (~15 min on 2 cores)
	$(PY) benchmarks/sweep.py

accuracy: $(STAMP)  ## end-to-end accuracy on held-out CPU workloads (~25 min on 2 cores; a quiet machine)
	$(PY) benchmarks/accuracy.py --out runs/accuracy

clean:
	rm -rf $(VENV) build *.egg-info
