#!/bin/sh
# Which index `make` installs torch from; prints pip's index arguments (or nothing) on stdout and
# the reason on stderr. Usage: infra/torch_index.sh PYTHON CPU_INDEX_URL
#   * an NVIDIA GPU here (nvidia-smi lists one, or /dev/nvidia0 exists): nothing, i.e. the default
#     index, whose Linux torch is the CUDA build;
#   * no GPU, and the CPU index answers within 5 s: `--index-url CPU_INDEX_URL` (the CPU wheel,
#     ~200 MB, instead of the multi-GB CUDA build with its nvidia-* wheels);
#   * no GPU, and the CPU index does not answer (offline, a mirror-only network): nothing, so
#     pip's own configuration decides (a local CPU wheel, a mirror); the Makefile then fails the
#     install if what came was a CUDA build.
python=${1:?usage: torch_index.sh PYTHON CPU_INDEX_URL}
cpu_index=${2:?usage: torch_index.sh PYTHON CPU_INDEX_URL}
if { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } || [ -e /dev/nvidia0 ]; then
    echo "torch: an NVIDIA GPU is present: the default index (CUDA build)" >&2
    exit 0
fi
if "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=5)" \
        "$cpu_index" >/dev/null 2>&1; then
    echo "torch: no NVIDIA GPU: the CPU wheel from $cpu_index" >&2
    echo "--index-url $cpu_index"
else
    echo "torch: no NVIDIA GPU, and $cpu_index does not answer: pip's configured index (must hold a CPU wheel)" >&2
fi
