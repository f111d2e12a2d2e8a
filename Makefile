# Each target sets up .venv itself on first use: torch pinned first (a bare `torch` pulls a CUDA build).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: emulate test test-slow test-sglang sglang-venv test-vllm vllm-venv lint format bench bench-sweep accuracy clean

$(STAMP): pyproject.toml replayer/cuda_guard.cpp replayer/hot_path.cpp
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m replayer.native  # the CUDA device guard for a CPU-only torch (~2 s) and the C++ hot path (~30 s)
	touch $(STAMP)

emulate: $(STAMP)  ## the main job on the embedded default (hf-cb, Llama-3.1-8B, virtual H100)
	$(VENV)/bin/revati emulate

test: $(STAMP)  ## lint + the default test suite (no GPU needed)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)  ## the slow-marked tests
	$(VENV)/bin/pytest -q -m slow

# SGLang under emulation lives in a venv of its own: SGLang installed without its dependencies (they pin
# CUDA builds of torch and its CUDA kernel wheel, which loads a CUDA library at import), then the
# pure-Python ones it imports; the GPU-only ones are stand-ins (replayer/standins). pip then reports
# SGLang's declared requirements as unmet (torch 2.14.1, sglang-kernel, ...): expected.
SGL_VENV := .venv-sglang
SGL_STAMP := $(SGL_VENV)/.installed
SGL_NO_DEPS := sglang==0.5.23 compressed-tensors==0.18.0 xgrammar==0.2.7
SGL_DEPS := transformers==5.19.0 tokenizers==0.23.2 triton==3.8.0 apache-tvm-ffi==0.1.11 \
	sentencepiece==0.2.1 openai==2.8.0 aiohttp==3.14.5 dill==0.4.1 einops==0.8.2 fastapi==0.165.0 \
	gguf==0.19.0 ipython==9.18.1 loguru==0.7.3 msgspec==0.22.0 orjson==3.13.0 \
	partial-json-parser==0.2.1.1.post7 pillow==13.0.0 psutil==7.2.2 pybase64==1.5.1 pyzmq==27.3.0 \
	requests==2.34.2 setproctitle==1.3.8 uvicorn==0.54.0 uvloop==0.23.0 cuda-python==13.4.4 \
	opentelemetry-api==1.45.2 jsonschema==4.26.0 soundfile==0.14.0 python-multipart==0.0.34

$(SGL_STAMP): pyproject.toml Makefile
	test -x $(SGL_VENV)/bin/python || python3 -m venv $(SGL_VENV)
	$(SGL_VENV)/bin/pip install -q torch==2.13.0
	$(SGL_VENV)/bin/pip install -q --no-deps $(SGL_NO_DEPS)
	$(SGL_VENV)/bin/pip install -q $(SGL_DEPS)
	$(SGL_VENV)/bin/pip install -q -e '.[dev]'
	$(SGL_VENV)/bin/python -m replayer.native
	touch $(SGL_STAMP)

sglang-venv: $(SGL_STAMP)  ## .venv-sglang: SGLang, GPU-free (run .venv-sglang/bin/revati emulate --engine sglang)

test-sglang: $(SGL_STAMP)  ## SGLang's own engine under emulation (slow: minutes)
	$(SGL_VENV)/bin/pytest -q -m sglang tests/test_sglang.py

# vLLM under emulation: vLLM's own CUDA wheel installed without its dependencies (they pin a CUDA torch and
# GPU-only kernel packages), then the pure-Python ones it imports, with torch held at the CPU build. Its
# compiled CUDA extensions are never loaded: replayer.shims answers those imports with stand-ins.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_NO_DEPS := vllm==0.32.0
VLLM_DEPS := aiohttp==3.14.5 anthropic==2.13.0 apache-tvm-ffi==0.1.15.post2 blake3==1.0.11 cachetools==8.0.2 \
	cbor2==6.3.0 cloudpickle==3.1.3 compressed-tensors==0.17.0 depyf==0.20.0 einops==0.8.2 fastapi==0.136.3 \
	filelock==4.2.12 huggingface_hub==2.4.0 ijson==3.6.0 jsonschema==4.26.0 lark==1.2.2 llguidance==1.7.6 \
	lm-format-enforcer==0.11.3 mcp==2.3.0 mistral_common==1.13.1 model-hosting-container-standards==0.1.16 \
	msgspec==0.22.0 ninja==1.13.2 numba==0.65.0 numpy==2.3.5 openai==3.57.0 opencv-python-headless==5.0.0.93 \
	opentelemetry-api==1.45.2 opentelemetry-exporter-otlp==1.45.2 opentelemetry-sdk==1.45.2 \
	opentelemetry-semantic-conventions-ai==0.5.1 oss-harmony==0.0.11 outlines_core==0.2.14 \
	partial-json-parser==0.2.1.1.post7 pillow==13.0.0 prometheus-fastapi-instrumentator==8.1.0 \
	prometheus_client==0.26.0 protobuf==7.36.2 psutil==7.2.2 py-cpuinfo==9.0.0 pybase64==1.5.1 \
	pydantic==2.14.4 python-json-logger==4.2.0 pyyaml==6.0.4 pyzmq==27.3.0 regex==2026.11.19 requests==2.34.2 \
	safetensors==0.8.0 sentencepiece==0.2.3 setproctitle==1.3.8 starlette==1.10.0 tiktoken==0.14.0 \
	tokenizers==0.23.3 tqdm==4.70.1 transformers==5.19.0 watchfiles==1.3.0 xgrammar==0.2.8 triton==3.9.0 \
	uvicorn==0.54.0 uvloop==0.23.0

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	echo torch==2.13.0 > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps $(VLLM_NO_DEPS)
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/constraints.txt $(VLLM_DEPS)
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/constraints.txt -e '.[dev]'
	$(VLLM_VENV)/bin/python -m replayer.native
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)  ## .venv-vllm: vLLM, GPU-free (run .venv-vllm/bin/revati emulate --engine vllm)

test-vllm: $(VLLM_STAMP)  ## vLLM's own engine under emulation (slow: minutes)
	$(VLLM_VENV)/bin/pytest -q -m vllm tests/test_vllm.py

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
	rm -rf $(VENV) $(SGL_VENV) $(VLLM_VENV) build *.egg-info
