# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench-quality bench-latency clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/rankdown info
	$(VENV)/bin/rankdown eval --task math

clean:
	rm -rf $(VENV) build *.egg-info
