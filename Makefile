# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned. Where it comes from (infra/torch_index.sh): without an NVIDIA GPU, PyTorch's
# CPU index when it answers (the default index's Linux torch is a multi-GB CUDA build), else
# pip's configured index; with a GPU, the default index (CUDA). A TORCH_SPEC that names its own
# index (`--index-url ...`) is used as it is.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv install demo test test-cluster browser-deps bench bench-smoke bench-peers clean

# After torch, a constraints file pins the build that was installed (for example
# 2.13.0+cpu), so the project's own install cannot replace it with another (CUDA) build;
# the last line fails the install if it did anyway. Unless TORCH_SPEC names its own index, a
# CUDA build of torch on a machine where CUDA is not usable fails the install at once.
$(VENV)/.installed: pyproject.toml m2t_core/csrc/exact_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC) $(if $(findstring index-url,$(TORCH_SPEC)),,$$(sh infra/torch_index.sh $(PY) $(TORCH_CPU_INDEX)))
	$(if $(findstring index-url,$(TORCH_SPEC)),,$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda is None or torch.cuda.is_available() \
		else 'torch ' + torch.__version__ + ' is a CUDA build, and this machine has no usable GPU: rm -r $(VENV), then make again (README: Install)')")
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
# loopback, and `ray job submit` to a `ray start --head`): node loss, driver kill, resume; and
# docs/deploy.md followed on one machine (tests/test_infra_deploy_guide.py, ~3 min more).
# 4 min 12 s to 4 min 54 s on the 2-core VM (shared with other work); CI runs them after `make test`.
test-cluster: $(VENV)/.installed
	$(PY) -m pytest -q -m cluster tests/test_multinode.py tests/test_job_submit.py tests/test_infra_deploy_guide.py

# Debian's chromium and chromium-driver for the browser test of `m2t browse`
# (tests/test_browse.py; it skips without them, fails under M2T_REQUIRE_BROWSER=1). Needs root.
browser-deps:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

bench: $(VENV)/.installed
	$(PY) bench/codec_speed.py --quick

# Every script in bench/ once, at its smallest settings: that each runs to the end (~10 min; CI runs it)
bench-smoke: $(VENV)/.installed
	$(PY) bench/smoke.py

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
