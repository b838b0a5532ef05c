"""The test archive for the end-to-end tests: the shared corpus when present, else the demo archive."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# dlib's example photos: human-annotated boxes (tight eyebrow-to-chin), faces big enough for MTCNN.
SHARED_DETECTION_SOURCES = ("detection/dlib/",)


@dataclass
class TestArchive:
    files: dict[str, bytes]  # relative key -> bytes
    gt_boxes: dict[str, list[list[float]]] = field(default_factory=dict)  # key -> [x1,y1,x2,y2] in oriented pixels
    min_faces: dict[str, int] = field(default_factory=dict)  # key -> at least this many faces
    undecodable: set[str] = field(default_factory=set)
    manifest_entries: dict[str, dict] = field(default_factory=dict)
    from_shared: bool = False


def build_test_archive(shared_root: Path | None, scratch: Path) -> TestArchive:
    if shared_root is not None and (shared_root / "faces" / "MANIFEST.json").is_file():
        manifest = json.loads((shared_root / "faces" / "MANIFEST.json").read_text())
        archive = TestArchive(files={}, from_shared=True)
        for entry in manifest["files"]:
            path = entry["path"]
            if not (entry["set"] == "robustness" or path.startswith(SHARED_DETECTION_SOURCES)):
                continue
            archive.files[path] = (shared_root / "faces" / path).read_bytes()
            archive.manifest_entries[path] = entry
            labels = entry.get("labels") or {}
            if (entry.get("image") or {}).get("undecodable"):
                archive.undecodable.add(path)
            if labels.get("gt_boxes"):
                ignore = labels.get("gt_ignore") or [False] * len(labels["gt_boxes"])
                archive.gt_boxes[path] = [[x, y, x + w, y + h] for (x, y, w, h), ig in zip(labels["gt_boxes"], ignore) if not ig]
            if path.startswith("robustness/pillow/hopper") and labels.get("face_count") == 1 and path not in archive.undecodable:
                archive.min_faces[path] = 1
        return archive

    from facebatch.demo import build_demo_archive

    names = build_demo_archive(scratch)
    archive = TestArchive(files={n: (scratch / "archive" / n).read_bytes() for n in names})
    archive.min_faces = {"portraits/astronaut.jpg": 1, "events/group.jpg": 3, "events/sideways_exif6.jpg": 1, "portraits/tilted.png": 1}
    archive.undecodable = {"broken/truncated.jpg", "broken/not_a_photo.jpg", "broken/empty.png"}
    return archive


def iou(a, b) -> float:
    from facebatch.evaluation import box_iou

    return float(box_iou([a], [b])[0, 0])
