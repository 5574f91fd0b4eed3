#!/usr/bin/env bash
# One command installs Lookalike on a fresh Debian/Ubuntu machine with Python 3.11:
#   1. Debian's Fashion-MNIST package (the real product images the demo and tests use), Debian's
#      chromium (the browser tests/test_try_page.py drives, headless, through Playwright), and the emoji
#      renders of the colour development catalog (Debian's Noto Color Emoji and Unicode data; npm tarballs),
#   2. a virtual environment in .venv with the project and every extra (CPU build of torch),
#   3. the torchvision shim that makes PyPI's CUDA-built torchvision import next to CPU torch.
# Re-running it is safe and quick: each step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LOOKALIKE_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

step() { printf '\n==> %s\n' "$*"; }

step "Debian packages: dataset-fashion-mnist, chromium, fonts-noto-color-emoji, unicode-data"
DEBS=()
[ -d /usr/share/datasets/fashion-mnist ] || DEBS+=(dataset-fashion-mnist)
# The emoji catalog (lookalike/catalogs/emoji.py): Noto Color Emoji renders and Unicode's emoji names.
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || DEBS+=(fonts-noto-color-emoji)
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || DEBS+=(unicode-data)
# The try page's browser test runs Debian's chromium; Playwright (a dev dependency) only drives it:
# `playwright install` and its browser downloads are never used.
[ -x /usr/bin/chromium ] || DEBS+=(chromium)
# The alerts' tests: `promtool test rules`, and the Prometheus server that evaluates them against a live stack.
[ -x /usr/bin/promtool ] || DEBS+=(prometheus)
if [ ${#DEBS[@]} -eq 0 ]; then
  echo "already installed"
else
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${DEBS[@]}"
fi

step "Emoji renders from npm: Fluent Emoji 3D, Twemoji, OpenMoji"
# `lookalike catalog import emoji` reads these tarballs as they are (no node_modules); without npm it
# says how to get them and imports the design sets it has.
SOURCES=${LOOKALIKE_HOME:-.lookalike}/sources
mkdir -p "$SOURCES"
NPMS=()
compgen -G "$SOURCES/lobehub-fluent-emoji-3d-*.tgz" >/dev/null || NPMS+=(@lobehub/fluent-emoji-3d@1.1.0)
compgen -G "$SOURCES/discordapp-twemoji-*.tgz" >/dev/null || NPMS+=(@discordapp/twemoji@16.0.1)
compgen -G "$SOURCES/openmoji-*.tgz" >/dev/null || NPMS+=(openmoji@17.0.0)
if [ ${#NPMS[@]} -eq 0 ]; then
  echo "already in $SOURCES"
elif command -v npm >/dev/null; then
  (cd "$SOURCES" && npm pack --silent "${NPMS[@]}") || echo "npm pack failed: the emoji import will say what is missing"
else
  echo "npm is not on the PATH: skipped ${NPMS[*]} (get them with \`npm pack NAME\` in $SOURCES)"
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
