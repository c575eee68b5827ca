# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install demo test bench bench-peers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[pipeline,test]"
	touch $@

venv install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) jobs/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/codec_speed.py --quick

# CompressAI (the peers of bench/peer_speed.py) is deliberately not in pyproject.toml: its
# dependencies pull a CUDA build of torch (and torchvision) over the pinned CPU torch. So it is
# installed here without dependencies, with the few pure-Python ones it imports. The only
# torchvision wheel may be a CUDA build that cannot load against CPU torch; peer_speed.py works
# around that (CompressAI's models do not use torchvision).
COMPRESSAI_SPEC ?= compressai==1.2.8 einops torch-geometric psutil pyparsing xxhash pytorch-msssim torchvision==0.28.0

bench-peers: $(VENV)/.installed
	$(PIP) install -q --no-deps $(COMPRESSAI_SPEC)
	$(PY) bench/peer_speed.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
