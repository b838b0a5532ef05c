"""Every knob of an indexing run, with its default and its validation, in one place.

Bad values fail fast with a message that says what to fix: `ConfigError` is raised before
any cluster work starts, and the CLI turns it into a one-line error with exit code 2.

Each knob is declared once, as a field: its type, its default, and (in the field's metadata,
see `cli_option`) its command-line form and help. facebatch.cli builds the options of `facebatch
index` and jobs/index_archive.py from these fields, and the run's config from the parsed options.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable


from .errors import ConfigError  # noqa: F401  (facebatch.config.ConfigError is the name callers use)


DEVICES = ("auto", "cpu", "cuda")


def cli_option(help: str, group: str | None = None, *, flag: str | None = None, parse: Callable | None = None,
               action: Any = None, positional: bool = False, required: bool = False) -> dict[str, Any]:
    """A field's command-line form (metadata read by facebatch.cli): `--<name-with-dashes>` unless
    `flag` says otherwise, in the help group `group`, with the field's default."""
    return {"cli": {"help": help, "group": group, "flag": flag, "parse": parse, "action": action,
                    "positional": positional, "required": required}}


def positive_int(text: str) -> int:
    """An option's text as an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def thresholds_arg(text: str) -> tuple[float, float, float]:
    """`0.6,0.7,0.7` as the three cascade thresholds."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be three comma-separated numbers, got {text!r}")
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"thresholds must be three comma-separated numbers (P,R,O-Net), got {text!r}")
    return values  # type: ignore[return-value]

# A run id names files and folders under OUT (_staging/<id>/, <table>/<id>.parquet, _runs/<id>.json):
# one plain path segment, never a way out of OUT.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(
            f"run id {run_id!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return run_id


@dataclass(frozen=True)
class DetectorParams:
    """Parameters that change detection results (part of the pipeline version)."""

    min_face_size: int = field(default=20, metadata=cli_option(
        "smallest face in pixels (default %(default)s)", "detector", parse=int))
    thresholds: tuple[float, float, float] = field(default=(0.6, 0.7, 0.7), metadata=cli_option(
        "P-Net,R-Net,O-Net score thresholds (default 0.6,0.7,0.7)", "detector", parse=thresholds_arg))
    scale_factor: float = field(default=0.709, metadata=cli_option(
        "image pyramid scale factor (default %(default)s)", "detector", parse=float))

    def validate(self) -> None:
        if not isinstance(self.min_face_size, int) or self.min_face_size < 12:
            raise ConfigError(f"min_face_size must be an integer >= 12 (P-Net's window), got {self.min_face_size!r}")
        if len(self.thresholds) != 3 or not all(0.0 < float(t) < 1.0 for t in self.thresholds):
            raise ConfigError(f"thresholds must be three numbers in (0, 1) for P-Net, R-Net, O-Net, got {self.thresholds!r}")
        if not 0.1 <= float(self.scale_factor) < 1.0:
            raise ConfigError(f"scale_factor must be in [0.1, 1.0), got {self.scale_factor!r}")


@dataclass(frozen=True)
class IndexConfig:
    """One indexing run: `facebatch index SOURCE --out OUT` and jobs/index_archive.py."""

    source: str = field(metadata=cli_option(
        "local directory, s3://bucket/prefix, or a manifest .csv/.parquet with a 'uri' column", positional=True))
    out: str = field(metadata=cli_option("output root (local directory or s3://bucket/prefix)", required=True))
    detector: DetectorParams = field(default_factory=DetectorParams)  # its fields are options of their own
    # Decoding. max_pixels guards against decompression bombs (checked from the header, before
    # decoding); max_side bounds the resolution the models see (JPEGs use reduced-size DCT decode).
    max_pixels: int = field(default=100_000_000, metadata=cli_option(
        "reject images above this many pixels, read from the header (default %(default)s)", "decoding", parse=positive_int))
    max_side: int = field(default=2048, metadata=cli_option(
        "longest side the models see; bigger JPEGs use reduced-size decoding (default %(default)s)", "decoding",
        parse=positive_int))
    # nvJPEG: the read tasks pass JPEG files on undecoded and the CUDA actors decode them in
    # batches on their GPU (facebatch/device_jpeg.py; needs torchvision, the 'gpu' extra).
    gpu_jpeg_decode: bool = field(default=False, metadata=cli_option(
        "decode JPEGs on the inference actors' GPUs with nvJPEG (needs CUDA actors and torchvision; "
        "a different pipeline version, as its pixels differ slightly from the CPU decoder's)", "decoding",
        action="store_true"))
    embed: bool = field(default=True, metadata=cli_option(
        "detect faces only, no embeddings", "decoding", flag="--no-embed", action="store_false"))
    device: str = field(default="auto", metadata=cli_option(
        "auto | cpu | cuda | cuda:N (default auto: cuda when available)", "detector"))
    # Ray sizing; None = derived from the cluster's resources when the run starts.
    batch_size: int | None = field(default=None, metadata=cli_option(
        "images per inference batch (default 64 on GPU, 16 on CPU)", "ray", parse=positive_int))
    # The inference actor pool: num_actors to start with (the minimum), growing up to max_actors
    # while work is queued when the cluster can add nodes (KubeRay / `ray up` autoscaling), and
    # shrinking when idle. None = one per GPU present; on CPU one 1-thread actor per core, fewer
    # with more threads where a node's memory holds fewer (pipeline.cpu_pool), at most max_actors.
    # max None = min, a fixed pool.
    num_actors: int | None = field(default=None, metadata=cli_option(
        "inference actors to start with (default: one per GPU; on CPU one single-threaded actor per core, "
        "fewer with more threads where a node's memory holds fewer, at most --max-actors)", "ray", parse=positive_int))
    max_actors: int | None = field(default=None, metadata=cli_option(
        "let the actor pool grow up to this many while work is queued (autoscaling clusters add "
        "nodes for them) and shrink when idle (default: --num-actors, a fixed pool); on CPU without "
        "--num-actors it also caps the starting pool", "ray", parse=positive_int))
    # Fractional GPUs: N actors share each GPU (each asks Ray for 1/N of one), so one actor's host
    # work (batch assembly, uploads, NMS bookkeeping) overlaps another's GPU work.
    actors_per_gpu: int = field(default=1, metadata=cli_option(
        "inference actors sharing each GPU (each takes 1/N of it, and plans its calls for 1/N of its "
        "memory); 2-3 keep a GPU busy while one actor does host work (default %(default)s)", "ray",
        parse=positive_int))
    read_concurrency: int | None = field(default=None, metadata=cli_option(
        "concurrent fetch+decode tasks", "ray", parse=positive_int))
    # Fetch + decode in separate Ray tasks (True) or inside the inference actors (False);
    # None = separate on GPU clusters (keeps the GPUs fed), inside the actors on CPU-only ones.
    decode_tasks: bool | None = field(default=None, metadata=cli_option(
        "fetch+decode in separate Ray tasks (default on GPU clusters) or in the inference actors (default on CPU)", "ray",
        action=argparse.BooleanOptionalAction))
    # Incremental behaviour.
    full: bool = field(default=False, metadata=cli_option(
        "reprocess every object, even those already indexed", "incremental", action="store_true"))
    reprocess_errors: bool = field(default=False, metadata=cli_option(
        "also retry objects whose last row has an error status", "incremental", action="store_true"))
    prune: bool = field(default=False, metadata=cli_option(
        "remove rows of objects no longer in SOURCE", "incremental", action="store_true"))
    limit: int | None = field(default=None, metadata=cli_option(
        "process at most this many objects this run (for staged backfills)", "incremental", parse=positive_int))
    # Fetch retries (S3 throttling / 5xx, flaky disks) before an object gets an error row.
    fetch_retries: int = field(default=5, metadata=cli_option(
        "retries of a failing fetch (default %(default)s)", "incremental", parse=int))
    # A run whose objects mostly fail to fetch (expired credentials, AccessDenied, an unreachable
    # endpoint) fails instead of publishing a table of error rows: above this fraction of
    # fetch_failed objects (and at least 20 of them, or all when fewer;
    # see pipeline.too_many_fetch_failures) nothing is published.
    max_error_rate: float = field(default=0.5, metadata=cli_option(
        "fail the run, publishing nothing, when more than this fraction of its objects cannot be "
        "fetched (at least 20, or all when fewer): an outage, not bad photos (default %(default)s)", "incremental",
        parse=float))
    # S3-compatible endpoint; None = boto3's own chain (AWS_ENDPOINT_URL[_S3], config files).
    s3_endpoint: str | None = field(default=None, metadata=cli_option(
        "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)", "incremental"))
    run_id: str | None = field(default=None, metadata=cli_option(
        "explicit run id: letters, digits, '.', '_', '-' (default: UTC timestamp + random suffix)", "incremental"))
    rows_per_row_group: int = 50_000  # not an option: tests and benchmarks set it

    def validate(self) -> "IndexConfig":
        if not self.source:
            raise ConfigError("SOURCE is empty: give a local directory, s3://bucket/prefix, or a manifest .csv/.parquet")
        if not self.out:
            raise ConfigError("--out is required: a local directory or s3://bucket/prefix for the tables")
        self.detector.validate()
        if self.device.startswith("cuda:"):
            # Ray gives each inference actor its own GPU (it sets CUDA_VISIBLE_DEVICES per actor),
            # so an index run cannot honour a device number: refused rather than silently changed.
            raise ConfigError(
                f"--device {self.device}: Ray assigns each inference actor its own GPU, so an index run takes "
                "--device cuda (or auto) and --num-actors/--max-actors; to keep a machine's run off some "
                "GPUs, start Ray there with CUDA_VISIBLE_DEVICES set (`facebatch detect` does take cuda:N)")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("batch_size", "num_actors", "max_actors", "read_concurrency", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.actors_per_gpu, bool) or not isinstance(self.actors_per_gpu, int) \
                or not 1 <= self.actors_per_gpu <= 8:
            raise ConfigError(f"actors_per_gpu must be an integer from 1 to 8, got {self.actors_per_gpu!r}")
        if self.max_actors is not None and self.num_actors is not None and self.max_actors < self.num_actors:
            raise ConfigError(f"--max-actors {self.max_actors} is below --num-actors {self.num_actors}: "
                              "the pool starts at --num-actors and grows up to --max-actors")
        if self.max_pixels < 1_000_000:
            raise ConfigError(f"max_pixels must be at least 1,000,000, got {self.max_pixels}")
        if not 64 <= self.max_side <= 65535:
            raise ConfigError(f"max_side must be between 64 and 65535 pixels, got {self.max_side}")
        if self.fetch_retries < 0 or self.fetch_retries > 20:
            raise ConfigError(f"fetch_retries must be between 0 and 20, got {self.fetch_retries}")
        if isinstance(self.max_error_rate, bool) or not isinstance(self.max_error_rate, (int, float)) \
                or not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"max_error_rate must be a fraction between 0 and 1, got {self.max_error_rate!r}")
        if self.run_id is not None:
            check_run_id(self.run_id)
        from .storage import parse_location  # raises ConfigError for schemes we cannot read

        parse_location(self.out)
        parse_location(self.source)
        if self.full and self.reprocess_errors:
            raise ConfigError("--full already reprocesses everything; drop --reprocess-errors")
        if self.rows_per_row_group < 1000:
            raise ConfigError("rows_per_row_group must be at least 1000")
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def s3_endpoint_url(self) -> str | None:
        return self.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def pipeline_version(model_hashes: dict[str, str], config: IndexConfig) -> str:
    """A short stable hash of everything that changes results: model files, parameters (the pixel
    limit included) and the version of the code of the decoder, detector, alignment and embedder.

    Two runs with the same pipeline version produce the same rows for the same bytes, so
    an (uri, etag) already indexed under it is skipped.
    """
    material = version_material(model_hashes, config)
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return f"v1-{digest[:12]}"


def version_material(model_hashes: dict[str, str], config: IndexConfig) -> dict[str, Any]:
    """What `pipeline_version` hashes."""
    from . import versions

    material = {
        "models": dict(sorted(model_hashes.items())),
        "detector": dataclasses.asdict(config.detector),
        "max_side": config.max_side,
        # Photos above the pixel limit are 'too_large' rows: a different limit, different rows.
        "max_pixels": config.max_pixels,
        # The code that computes results (facebatch/versions.py: bump with any result-changing change).
        "code": {"detector": versions.DETECTOR_CODE_VERSION, "alignment": versions.ALIGNMENT_CODE_VERSION,
                 "decoder": versions.DECODER_CODE_VERSION, "embedder": versions.EMBEDDER_CODE_VERSION},
        "embed": config.embed,
        # 2: embeddings are flip-averaged (facebatch.embedder), a different vector per face.
        "schema": 2,
    }
    if config.gpu_jpeg_decode:  # nvJPEG's pixels are not libjpeg's: other rows (absent otherwise,
        material["jpeg_decoder"] = "nvjpeg"  # so that existing versions stay what they were)
    return material
