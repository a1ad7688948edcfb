#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh Debian machine (the README's second command; CI runs it).
# Installs the real peers the tests use (DCMTK, dicom3tools, Orthanc, PostgreSQL), a venv with the CPU build of
# torch, then runs ruff, mypy and pytest. Every service a test needs is started by that test, on 127.0.0.1 only
# (PostgreSQL on a Unix socket in a temp folder, no TCP port at all).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in dcmtk dicom3tools orthanc orthanc-dicomweb postgresql chromium chromium-driver; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
command -v npm >/dev/null || need+=(npm)  # any npm will do (Debian's, or one that came with nodejs)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # never let a package start its service (Orthanc would listen on all interfaces)
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  $SUDO rm -f /usr/sbin/policy-rc.d
fi

# OHIF Viewer's prebuilt dist/ for the browser test (tests/ohif.py): the npm package's tarball alone, no
# dependencies, unpacked into the ignored .cache/ohif/<version>/
OHIF_VERSION=3.13.2
if [ ! -f ".cache/ohif/$OHIF_VERSION/package/dist/index.html" ]; then
  mkdir -p ".cache/ohif/$OHIF_VERSION"
  tgz=$(cd ".cache/ohif/$OHIF_VERSION" && npm pack --silent "@ohif/app@$OHIF_VERSION")
  tar xzf ".cache/ohif/$OHIF_VERSION/$tgz" -C ".cache/ohif/$OHIF_VERSION" && rm ".cache/ohif/$OHIF_VERSION/$tgz"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch pinned in the same step: pip takes the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m mypy  # what it checks and how: [tool.mypy] in pyproject.toml
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
