# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# A persistent inductor cache keeps repeated test runs (and CI on the same machine) from recompiling.
export TORCHINDUCTOR_CACHE_DIR ?= $(HOME)/.cache/glif2/inductor

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,dali,dvs,train,plot,export]'
	$(PY) -m pip install --quiet --no-deps spikingjelly==2.0.0
	touch $@

demo: $(VENV)/.installed
	$(PY) train.py

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) bench/neuron.py

clean:
	rm -rf $(VENV) build *.egg-info
