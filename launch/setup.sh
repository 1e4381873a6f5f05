#!/usr/bin/env bash
# Set up this machine for caco, idempotently:
#   bash launch/setup.sh          system packages for the demo + the Python package
#   bash launch/setup.sh --ffcv   + FFCV (data.loader=ffcv): its build libraries + the ffcv extra
#   bash launch/setup.sh --dev    + what the test suite needs (pytest, ruff, FFCV, chromium)
# System packages come from apt where it is available (root, or passwordless sudo); elsewhere
# the demo falls back to torchvision's Fashion-MNIST download (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
ffcv=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1; ffcv=1 ;;
    --ffcv) ffcv=1 ;;
    *) echo "setup.sh: unknown option '$arg' (use --dev or --ffcv)" >&2; exit 2 ;;
  esac
done

apt_packages=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_packages+=(dataset-fashion-mnist)
if [ "$dev" = 1 ]; then
  # The MLflow UI test renders pages in headless Chromium.
  command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
fi
if [ "$ffcv" = 1 ]; then
  # ffcv 1.0.2 builds from source against these and links them at run time.
  for pkg in pkg-config libopencv-dev libturbojpeg0-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || apt_packages+=("$pkg")
  done
fi

if [ ${#apt_packages[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    install() {
      DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y \
        --no-install-recommends "${apt_packages[@]}"
    }
    if ! install >/tmp/caco-setup-apt.log 2>&1; then
      $sudo apt-get -o DPkg::Lock::Timeout=600 update >>/tmp/caco-setup-apt.log 2>&1 || true
      install >>/tmp/caco-setup-apt.log 2>&1 || {
        echo "setup.sh: could not install ${apt_packages[*]} (see /tmp/caco-setup-apt.log)" >&2
        exit 1
      }
    fi
    echo "setup.sh: installed ${apt_packages[*]}"
  else
    echo "setup.sh: no apt-get here; skipping ${apt_packages[*]} (see README for alternatives)"
  fi
fi

extras="."
[ "$ffcv" = 1 ] && extras=".[ffcv]"
[ "$dev" = 1 ] && extras=".[dev,ffcv]"
python -m pip install --disable-pip-version-check -q -e "$extras"
echo "setup.sh: python package installed ($extras)"
