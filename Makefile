# The README's two commands:  make test  |  make bench  (the default method x budget sweep, ~25 min on 2 cores)
# Both create .venv if needed and install the pinned, matched stack (a second install is a no-op).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
GPU    ?= $(shell nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)
STAMP  := $(VENV)/.installed-gpu$(GPU)

# torchrec 1.X = fbgemm 1.X = torch 2.(X+5); fbgemm-gpu-cpu has no torch pin, so pin all three here.
TORCH     := torch==2.13.0
FBGEMM    := $(if $(filter 1,$(GPU)),fbgemm-gpu==1.8.0,fbgemm-gpu-cpu==1.8.0)
TORCHREC  := torchrec==1.8.0

.PHONY: install test test-slow lint format bench bench-quick fit loader-bench scale-bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	$(PIP) install $(TORCH) $(FBGEMM)
	$(PIP) install --no-deps $(TORCHREC)
	$(PIP) install -e '.[dev]'
	$(PY) -c "import torch, fbgemm_gpu, torchrec, lightning; print('stack ok: torch', torch.__version__, '| torchrec', torchrec.__version__)"
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(VENV)/bin/recsys-embed bench

bench-quick: install
	$(VENV)/bin/recsys-embed bench --quick

fit: install
	$(VENV)/bin/recsys-embed fit --config experiments/ctr/synthetic_dlrm.yaml --test_after_fit true

loader-bench: install
	$(PY) benchmarks/loader_throughput.py

scale-bench: install
	$(PY) benchmarks/sharding_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
