# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install demo test test-cluster browser-deps bench bench-peers clean

# After torch, a constraints file pins the build that was installed (for example
# 2.13.0+cpu), so the project's own install cannot replace it with another (CUDA) build;
# the last line fails the install if it did anyway.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e ".[pipeline,test]"
	$(PY) -c "import torch, sys; want = open('$(VENV)/torch-constraint.txt').read().split('==')[1].strip(); \
		sys.exit(0 if torch.__version__ == want else 'torch changed during the install: ' + torch.__version__ + ' != ' + want)"
	touch $@

venv install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) jobs/demo.py

# The default suite; the multi-node cluster tests run in `make test-cluster` (CI runs both).
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not cluster" tests

# The multi-node tests alone (a Ray cluster of a 0-CPU head and two 1-CPU worker nodes on
# loopback, and `ray job submit` to a `ray start --head`): node loss, driver kill, resume.
# 4 min 12 s to 4 min 54 s on the 2-core VM (shared with other work); CI runs them after `make test`.
test-cluster: $(VENV)/.installed
	$(PY) -m pytest -q -m cluster tests/test_multinode.py tests/test_job_submit.py

# Debian's chromium and chromium-driver for the browser test of `m2t browse`
# (tests/test_browse.py; it skips without them, fails under M2T_REQUIRE_BROWSER=1). Needs root.
browser-deps:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

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
