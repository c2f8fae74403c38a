#!/usr/bin/env bash
# Stage, here, what a GPU machine's image lacks, for tools/device/check.sh to run there.
#
#   bash tools/install.sh && bash tools/device/stage.sh     # writes .device/ (git-ignored)
#
# The lent GPU machines (see docs/gpu.md) hold Python 3.12 with PyTorch, NumPy,
# SciPy, Matplotlib, OpenCV, PyYAML, tabulate, portalocker and pytest, but no Detectron2 and
# no package index. This copies the pure-Python packages Detectron2 and expedit-d2 import
# (detectron2 as tools/install.sh built it, fvcore, iopath, yacs, omegaconf, antlr4,
# termcolor) from ./.venv into .device/site/, and unpacks pycocotools' CPython 3.12 wheel
# (compiled) beside them: a few MB, carried with the working tree (`carry: [".device"]`).
# Idempotent: .device/ is rebuilt from scratch each time.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
vpy="${EXPEDIT_VENV:-$repo/.venv}/bin/python"
target_python="${DEVICE_PYTHON_VERSION:-3.12}"
log() { printf '[expedit-d2 device stage] %s\n' "$*" >&2; }

[ -x "$vpy" ] || { log "no virtual environment at $vpy: run bash tools/install.sh first"; exit 1; }
site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
out="$repo/.device"
rm -rf "$out.tmp" && mkdir -p "$out.tmp/site" "$out.tmp/wheels"

for pkg in detectron2 fvcore iopath yacs omegaconf antlr4 termcolor; do
    [ -d "$site/$pkg" ] || { log "$pkg is not in $site"; exit 1; }
    cp -r "$site/$pkg" "$out.tmp/site/"
done
find "$out.tmp/site" -name __pycache__ -prune -exec rm -rf {} +

pycoco="$("$vpy" -c 'from importlib.metadata import version; print(version("pycocotools"))')"
log "downloading pycocotools $pycoco for CPython $target_python (manylinux x86_64)"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$vpy" -m pip download --disable-pip-version-check --quiet --no-deps --only-binary=:all: \
    --python-version "$target_python" --implementation cp "${platforms[@]}" \
    -d "$out.tmp/wheels" "pycocotools==$pycoco"
"$vpy" - "$out.tmp" <<'PY'
import sys, zipfile, pathlib
root = pathlib.Path(sys.argv[1])
for wheel in (root / "wheels").glob("*.whl"):
    zipfile.ZipFile(wheel).extractall(root / "site")
PY
rm -rf "$out.tmp/wheels"
rm -rf "$out" && mv "$out.tmp" "$out"
log "staged $(du -sh "$out" | cut -f1) in $out: $(ls "$out/site" | tr '\n' ' ')"
