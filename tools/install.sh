#!/usr/bin/env bash
# Install expedit-d2 and everything it needs into a virtual environment.
#
#   bash tools/install.sh            # creates/updates ./.venv
#   EXPEDIT_VENV=/path/to/venv bash tools/install.sh
#   PYTHON=python3.11 bash tools/install.sh
#
# Idempotent: a second run with unchanged requirements does no package work.
# Steps: (1) venv, (2) requirements.txt (torch, fvcore, pycocotools, ...),
# (3) detectron2 (kept if it already imports, else built from the pb1-detectron2
# 0.6 source release, see tools/install/install_detectron2.py), (4) expedit-d2 itself,
# editable, (5) its optional extra "onnx" (onnx, onnxruntime, onnxscript: tools/export_onnx.py
# and its tests), kept if it already imports.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EXPEDIT_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

log() { printf '[expedit-d2 install] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    "$python" -c 'import sys; assert sys.version_info >= (3, 10), "expedit-d2 needs Python >= 3.10, found " + sys.version' \
        || { log "set PYTHON to a Python >= 3.10 interpreter"; exit 1; }
    log "creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
vpy="$venv/bin/python"
pip=("$vpy" -m pip --disable-pip-version-check --quiet)

# (2) requirements: skipped when the stamp matches the requirements file.
stamp="$venv/.expedit-requirements.sha256"
want="$(sha256sum "$repo/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    log "installing requirements.txt into $venv"
    "${pip[@]}" install -r "$repo/requirements.txt"
    echo "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
else
    log "requirements.txt already installed"
fi

# (3) detectron2
"$vpy" "$repo/tools/install/install_detectron2.py"

# (4) expedit-d2 itself (editable, so projects/ and tools/ use this checkout).
# Run from / so that the checkout itself is not on sys.path during the check.
if ! (cd / && "$vpy" -c 'import os, sys, expedit_d2; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(expedit_d2.__file__))) != sys.argv[1])' "$repo" 2>/dev/null)
then
    log "installing expedit-d2 (editable) from $repo"
    "${pip[@]}" install --no-deps --no-build-isolation -e "$repo"
fi
# (5) the optional extra [onnx], which the tests use (ONNX export and onnxruntime parity).
if ! "$vpy" -c 'import onnx, onnxruntime, onnxscript' 2>/dev/null; then
    log "installing the optional extra expedit-d2[onnx]"
    "${pip[@]}" install --no-build-isolation -e "$repo[onnx]"
fi
log "ready: $vpy"
