"""The table contract: every Arrow schema facebatch writes, declared once.

- `images`, `faces`: the index tables (one row per object, one row per face), written by an
  index run (writing.py) and merged by compaction;
- `people`, `face_people`: the people job's tables (people.py);
- the in-flight rows between the Ray stages (DECODED_SCHEMA, FACE_STRUCT) are derived from these
  fields, so a column's type is stated in one place.

Where the files live and how they become visible: out.py, publishing.py, swap.py, ARCHITECTURE.md.
"""

from __future__ import annotations

import pyarrow as pa

EMBEDDING_DIM = 128
# Cosine similarity of two flip-averaged embeddings above which they are the same person;
# calibrated on the shared verification pairs (facebatch/embedder.py's docstring,
# bench/eval_pairs.py). Here, with the table contract, so that reading it needs no torch.
COSINE_THRESHOLD = 0.936

IMAGE_STATUSES = ("ok", "not_image", "unsupported_format", "corrupt", "truncated", "too_large", "fetch_failed", "failed")

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("width", pa.int32()),  # after EXIF orientation; null when the image could not be decoded
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),  # detected from content (JPEG, PNG, ...), not from the extension
        pa.field("status", pa.string(), nullable=False),  # one of IMAGE_STATUSES
        pa.field("error", pa.string()),  # readable message when status != 'ok'
        pa.field("num_faces", pa.int32()),  # null when status != 'ok'
        pa.field("pipeline_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("indexed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

FACES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),  # 0 = highest detection score in the image
        pa.field("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in pixels of the oriented original
        pa.field("score", pa.float32()),
        pa.field("landmarks", pa.list_(pa.float32(), 10)),  # x,y of left eye, right eye, nose, left/right mouth
        pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM)),  # L2-normalised; cosine = dot product
        pa.field("face_size", pa.float32()),  # shorter box side in original pixels
        pa.field("roll", pa.float32()),  # degrees, eye line vs horizontal
        pa.field("yaw", pa.float32()),  # -1..1: nose offset from the eyes' midline / half eye distance
        pa.field("sharpness", pa.float32()),  # variance of the Laplacian of the aligned grey chip
        pa.field("pipeline_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

TABLES = {"images": IMAGES_SCHEMA, "faces": FACES_SCHEMA}


def empty_table(name: str) -> pa.Table:
    return TABLES[name].empty_table()


PEOPLE_SCHEMA = pa.schema(
    [
        pa.field("person_id", pa.string(), nullable=False),  # stable across runs: never renumbered
        pa.field("name", pa.string()),  # from --labels; null when unlabelled
        pa.field("num_faces", pa.int32()),
        pa.field("num_images", pa.int32()),
        pa.field("cover_image_id", pa.string()),  # the person's best-quality face
        pa.field("cover_face_index", pa.int32()),
        pa.field("centroid", pa.list_(pa.float32(), EMBEDDING_DIM)),  # L2-normalised mean embedding
        pa.field("first_run_id", pa.string()),  # the people run that created the person
        pa.field("last_run_id", pa.string()),  # the last people run that changed its faces
        pa.field("pipeline_version", pa.string(), nullable=False),
    ]
)

ASSIGNED_BY = ("cluster", "incremental", "label")
REASONS = ("low_score", "small_face", "profile", "blurred", "no_match")

FACE_PEOPLE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        pa.field("person_id", pa.string()),  # null = not assigned (see reason)
        pa.field("similarity", pa.float32()),  # cosine to the person's centroid
        pa.field("assigned_by", pa.string()),  # cluster | incremental | label; null when unassigned
        pa.field("reason", pa.string()),  # why unassigned: low_score | small_face | profile | blurred | no_match
        pa.field("face_run_id", pa.string()),  # the index run that wrote the face (detects re-indexed photos)
        pa.field("people_run_id", pa.string(), nullable=False),
        pa.field("pipeline_version", pa.string(), nullable=False),
    ]
)

PEOPLE_TABLES = {"people": PEOPLE_SCHEMA, "face_people": FACE_PEOPLE_SCHEMA}

# The objects of SOURCE as planning lists them (plan.py, inventory.py): one row per object.
PLAN_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("etag", pa.string()),
        pa.field("mtime", pa.float64()),
    ]
)


# ------------------------------------------------------------------ rows between the Ray stages
# Derived from the tables above, so that a column's type is declared once.

def _nullable(schema: pa.Schema, names: tuple[str, ...]) -> list[pa.Field]:
    return [schema.field(name).with_nullable(True) for name in names]


# What a read task (reading.py) hands the inference actors: one row per object, with its decoded
# pixels when status is 'ok'.
DECODED_SCHEMA = pa.schema(
    _nullable(IMAGES_SCHEMA, ("image_id", "uri", "etag", "size_bytes", "width", "height", "format", "status", "error"))
    + [
        pa.field("scale", pa.float32()),  # decoded pixels / original pixels (reduced-size JPEG decode)
        pa.field("pix_h", pa.int32()),
        pa.field("pix_w", pa.int32()),
        pa.field("pixels", pa.large_binary()),  # RGB uint8, pix_h x pix_w x 3, row-major
        # The JPEG file itself, for the actor to decode on its GPU (--gpu-jpeg-decode); pixels is null then.
        pa.field("encoded", pa.large_binary()),
        pa.field("fetch_s", pa.float32()),
        pa.field("decode_s", pa.float32()),
    ]
)

# One face as the inference actors return it (a list of these per image): the faces columns that
# the actor computes; image_id, pipeline_version and run_id are added by writing.split_output.
FACE_STRUCT = pa.struct(
    _nullable(FACES_SCHEMA, ("face_index", "box", "score", "landmarks", "embedding", "face_size", "roll", "yaw", "sharpness"))
)

# What a run stages for its publish to remove from older files (out.Out.replaced_ids / pruned_ids):
# the rows it replaces (image_id + pipeline_version) and, with --prune, the ids gone from SOURCE.
REPLACED_IDS_SCHEMA = pa.schema(_nullable(IMAGES_SCHEMA, ("image_id", "pipeline_version")))
PRUNED_IDS_SCHEMA = pa.schema(_nullable(IMAGES_SCHEMA, ("image_id",)))
