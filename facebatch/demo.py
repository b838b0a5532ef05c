"""`facebatch demo`: build a small archive from images that ship with installed packages, index it
on a local Ray instance, and query the result with DuckDB.

The faces come from scikit-image's bundled public-domain NASA portrait of Eileen Collins
("astronaut"), placed at several positions, scales and rotations; the archive also holds photos
without faces and some files that are broken on purpose, to show error rows.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def _gradient(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    base = rng.uniform(40, 200, size=(1, 1, 3)) + 50 * y + 30 * x
    noise = rng.normal(0, 6, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    h, w = patch.shape[:2]
    canvas[y : y + h, x : x + w] = patch


def build_demo_archive(root: str | os.PathLike) -> list[str]:
    """Write the demo archive under root/archive and return the file names."""
    from skimage import data

    archive = Path(root) / "archive"
    archive.mkdir(parents=True, exist_ok=True)
    astronaut = Image.fromarray(data.astronaut())
    portrait = astronaut.crop((120, 0, 340, 260))  # head and shoulders
    files: dict[str, bytes] = {}

    def jpeg(img: Image.Image, **kwargs) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92, **kwargs)
        return buf.getvalue()

    files["portraits/astronaut.jpg"] = jpeg(astronaut)
    # A group scene: the portrait at three scales on one canvas.
    canvas = _gradient(720, 1280, seed=1)
    for scale, (x, y) in zip((0.5, 1.0, 1.6), ((60, 400), (400, 200), (820, 150))):
        patch = np.asarray(portrait.resize((int(220 * scale), int(260 * scale)), Image.LANCZOS))
        _paste(canvas, patch, x, y)
    files["events/group.jpg"] = jpeg(Image.fromarray(canvas))
    # A rotated camera: pixels stored sideways with EXIF orientation 6 (rotate 90 clockwise to view).
    exif = Image.Exif()
    exif[0x0112] = 6
    files["events/sideways_exif6.jpg"] = jpeg(astronaut.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    # A tilted head, PNG.
    tilted = Image.fromarray(_gradient(600, 600, seed=2))
    tilted.paste(portrait.rotate(20, expand=True, fillcolor=(90, 110, 130)), (150, 120))
    buf = io.BytesIO()
    tilted.save(buf, "PNG")
    files["portraits/tilted.png"] = buf.getvalue()
    # No faces.
    files["scenery/coffee.jpg"] = jpeg(Image.fromarray(data.coffee()))
    files["scenery/rocket.jpg"] = jpeg(Image.fromarray(data.rocket()))
    # Broken on purpose: every one still gets an images row with an error status.
    files["broken/truncated.jpg"] = files["portraits/astronaut.jpg"][:5000]
    files["broken/not_a_photo.jpg"] = b"<html><body>this is a web page saved with a .jpg name</body></html>\n"
    files["broken/empty.png"] = b""
    for name, payload in files.items():
        path = archive / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != payload:
            path.write_bytes(payload)
    return sorted(files)


DEMO_QUERY = """
SELECT i.uri, i.status, i.num_faces, round(max(f.score), 3) AS best_score
FROM images i LEFT JOIN faces f USING (image_id)
GROUP BY ALL ORDER BY i.uri
"""


def run_demo(out: str, object_store_memory: int | None = None) -> int:
    from .config import IndexConfig
    from .pipeline import run_index
    from .query import connect
    from .summaries import format_summary

    root = Path(out).resolve()
    build_demo_archive(root)
    config = IndexConfig(source=str(root / "archive"), out=str(root / "tables"), max_side=1024)
    summary = run_index(config, object_store_memory=object_store_memory)
    print(format_summary(summary.record))
    con = connect(str(root / "tables"))
    print(f"\nDuckDB: faces per image ({root / 'tables'}):")
    print(DEMO_QUERY.strip())
    print(con.sql(DEMO_QUERY))
    return 0
