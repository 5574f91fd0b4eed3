#!/usr/bin/env bash
# One command installs Lookalike on a fresh Debian/Ubuntu machine with Python 3.11:
#   1. Debian's Fashion-MNIST package (the real product images the demo and tests use),
#   2. a virtual environment in .venv with the project and every extra (CPU build of torch),
#   3. the torchvision shim that makes PyPI's CUDA-built torchvision import next to CPU torch.
# Re-running it is safe and quick: each step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LOOKALIKE_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

step() { printf '\n==> %s\n' "$*"; }

step "Debian packages: dataset-fashion-mnist"
if [ -d /usr/share/datasets/fashion-mnist ]; then
  echo "already installed"
else
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

step "Python environment: $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# constraints.txt pins torch to the CPU build (2.13.0) and torchvision to its matching release;
# without it pip resolves a newer torch and downloads several GB of CUDA wheels.
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[all]"

step "torchvision on CPU torch"
# PyPI ships only CUDA builds of torchvision; their compiled ops need libtorch_cuda and fail to load
# against CPU torch, so `import torchvision` (and with it `import timm`) dies. The shim declares the
# missing op schemas just before torchvision is first imported. See install/torchvision_cpu_shim.py.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp install/torchvision_cpu_shim.py "$SITE/lookalike_torchvision_cpu_shim.py"
echo "import lookalike_torchvision_cpu_shim as s; s.install()" > "$SITE/lookalike-torchvision-cpu.pth"
"$VENV/bin/python" -c "import timm, torchvision; print('timm', timm.__version__, 'torchvision', torchvision.__version__, 'imports')"

step "Done. Try: $VENV/bin/lookalike --help"
