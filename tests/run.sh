#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh Debian 12 machine
# (run as root) and runs them. CI (.ci/run) calls exactly this.
#   - Debian packages: DCMTK (storescu, dcmcjpeg: the sending modality), Orthanc (the PACS)
#     and its DICOMweb plugin (orthanc-dicomweb: STOW-RS destinations; its tests skip without it),
#     and its Python plugin (orthanc-python: the plugin form, gateway.orthanc_plugin; its tests
#     skip without it),
#     systemd (systemd-analyze checks the unit file), openssl (the TLS tests make a test CA),
#     chromium and chromium-driver (the review console's browser test drives them via selenium)
#   - a virtual environment in .venv with the project and its `train`, `test` and `console`
#     extras
#   - ruff, then pytest (the long fault and fuzz runs are behind `-m slow`, not run here)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in dcmtk orthanc orthanc-dicomweb orthanc-python systemd openssl python3-venv \
      chromium chromium-driver; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
  fi
fi
for tool in /usr/bin/storescu /usr/sbin/Orthanc; do
  [ -x "$tool" ] || { echo "missing $tool: install Debian's dcmtk and orthanc (run this as root)" >&2; exit 1; }
done

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[train,test,console]'

.venv/bin/ruff check .
.venv/bin/python -m pytest -q -m "not slow" "$@"
