"""`facebatch people OUT`: group the faces of one pipeline version into persons, incrementally.

    select   faces of one pipeline version (DuckDB over OUT/faces); quality filter
    knn      cosine top-k per face (faiss; Ray tasks over blocks of faces on big runs)
    cluster  average linkage over the cut kNN graph, never two faces of one photo in one person,
             labelled names seed persons (facebatch.clustering)
    write    people + face_people tables and the search index, staged, then published with one
             journaled swap whose commit point is one small pointer object

Layout of OUT (beside the index's images/ and faces/):

    OUT/people/<run_id>.parquet        one row per person (a full snapshot of one pipeline version)
    OUT/face_people/<run_id>.parquet   one row per face of that version, sorted by image_id
    OUT/_search/<run_id>.faiss         faiss index; vector i is row i of the face_people file
    OUT/_people/<version>.json         the pointer: which files are current for a version

Readers that go through `facebatch.query.connect` or `facebatch search` read the pointer, so
they see the old generation or the new one, never a mix. The swap: the staged files are moved
into their folders, the pointer is replaced (one PUT / one rename: the commit), then the files
of the previous generation are deleted. The journal (`people.json` in the staging folder)
makes a crash at any step finishable by the next run; a crash before the journal is written
leaves the old generation current and the staging folder is discarded.

Incremental runs (the default) keep every face's person from the previous generation, assign
the faces that are new since then to the nearest existing person (centroid within the
threshold, one face per photo and person), and cluster what is left (new faces that matched no
one plus earlier faces that were never assigned) into new persons. `--full` reclusters
everything and gives each new cluster the old person_id it overlaps most, so ids keep their
meaning. A labels file that differs from the previous run's forces a full run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage, swap
from .config import ConfigError
from .out import Heartbeat, Out, fault_point
from .recovery import recover_staging
from .tables import COSINE_THRESHOLD, EMBEDDING_DIM, FACE_PEOPLE_SCHEMA, PEOPLE_SCHEMA

log = logging.getLogger("facebatch.people")



_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class QualityFilter:
    """Faces kept out of clustering (they stay searchable). Defaults, and why:

    - min_score 0.9: MTCNN's O-Net accepts from 0.7; the shared corpus's real faces score
      >= 0.9 almost always, its false positives (patterns, hands, backs of heads) mostly below.
    - min_face_size 32 px (shorter box side): the 150-px chip of a smaller face is an
      up-sampled blur and its embedding drifts towards every other small face.
    - max_abs_yaw 0.75: the yaw proxy (nose offset / half eye distance) passes 0.75 only near
      a profile, where one eye is hidden and the 5-point alignment is guesswork.
    - min_sharpness 5: variance of the Laplacian of the grey chip; motion-blurred or
      out-of-focus faces fall below it.
    The figures come from the index's `faces` table (score, face_size, yaw, sharpness).
    """

    min_score: float = 0.9
    min_face_size: float = 32.0
    max_abs_yaw: float = 0.75
    min_sharpness: float = 5.0

    def reasons(self, faces: pa.Table) -> np.ndarray:
        """The reason each face is filtered out (object array, None = kept)."""
        n = faces.num_rows

        def col(name: str, fill: float) -> np.ndarray:
            return np.nan_to_num(faces[name].to_numpy(zero_copy_only=False).astype(np.float64), nan=fill)

        reasons = np.full(n, None, dtype=object)
        # Later rules win: the first failing rule in this order is reported.
        for reason, bad in (
            ("blurred", col("sharpness", np.inf) < self.min_sharpness),
            ("profile", np.abs(col("yaw", 0.0)) > self.max_abs_yaw),
            ("small_face", col("face_size", 0.0) < self.min_face_size),
            ("low_score", col("score", 0.0) < self.min_score),
        ):
            reasons[bad] = reason
        return reasons


@dataclass(frozen=True)
class PeopleConfig:
    """One people run: `facebatch people OUT` and jobs/cluster_people.py."""

    out: str
    pipeline_version: str | None = None  # None = the newest version in OUT's images table
    full: bool = False
    labels: str | None = None  # CSV or Parquet: image_id, face_index, name (local or s3://)
    threshold: float = COSINE_THRESHOLD  # clustering and incremental assignment (cosine)
    k: int = 10  # neighbours per face in the kNN graph
    min_size: int = 2  # smaller clusters stay unassigned (unless labelled)
    quality: QualityFilter = QualityFilter()
    knn: str = "auto"  # auto | local | ray: where the kNN graph is built
    s3_endpoint: str | None = None
    run_id: str | None = None

    def validate(self) -> "PeopleConfig":
        if not self.out:
            raise ConfigError("OUT is required: the --out of `facebatch index`")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be a cosine similarity in (0, 1), got {self.threshold!r}")
        if not 1 <= self.k <= 100:
            raise ConfigError(f"k must be between 1 and 100, got {self.k!r}")
        if self.min_size < 1:
            raise ConfigError(f"min_size must be at least 1, got {self.min_size!r}")
        if self.knn not in ("auto", "local", "ray"):
            raise ConfigError(f"knn must be auto, local or ray, got {self.knn!r}")
        if self.run_id is not None and not _RUN_ID.match(self.run_id):
            raise ConfigError(f"run id {self.run_id!r} may only hold letters, digits, '.', '_' and '-'")
        return self

    def endpoint(self) -> str | None:
        return storage.endpoint_url(self.s3_endpoint)


# ----------------------------------------------------------------------------------------- state


def _read_generation_table(out: Out, pointer: dict, name: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(out.generation_file(pointer, name).fs_path(), filesystem=out.fs, columns=columns)


# ----------------------------------------------------------------------------------------- input


def _faces_of_version(out: Out, version: str | None) -> tuple[str, pa.Table]:
    from .query import connect

    con = connect(out)
    try:
        versions = con.execute(
            "SELECT pipeline_version FROM images GROUP BY 1 ORDER BY max(indexed_at) DESC"
        ).fetchall()
        known = [v[0] for v in versions]
        if not known:
            raise ConfigError(f"{out.uri()} holds no index (no images table): run `facebatch index SOURCE --out {out.uri()}` first")
        if version is None:
            version = known[0]
        elif version not in known:
            raise ConfigError(f"pipeline version {version!r} is not in {out.uri()} (it has: {', '.join(known)})")
        faces = con.execute(
            """SELECT image_id, face_index, embedding, score, face_size, yaw, sharpness, run_id
               FROM faces WHERE pipeline_version = ? ORDER BY image_id, face_index""",
            [version],
        ).to_arrow_table()
    finally:
        con.close()
    if faces.num_rows and faces["embedding"].null_count:
        raise ConfigError(f"pipeline version {version} was indexed with --no-embed: its faces have no embeddings to cluster")
    return version, faces


def _embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    if len(column) == 0:
        return np.zeros((0, EMBEDDING_DIM), np.float32)
    flat = pc.list_flatten(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    return np.ascontiguousarray(flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, EMBEDDING_DIM))


def _face_keys(image_id: pa.Array | pa.ChunkedArray, face_index: pa.Array | pa.ChunkedArray) -> pa.Array:
    return pc.binary_join_element_wise(pc.cast(image_id, pa.string()), pc.cast(face_index, pa.string()), "\x1f")


def read_labels(path: str, faces: pa.Table, endpoint: str | None) -> tuple[np.ndarray, list[str], str]:
    """The labels file -> (name code per face, -1 = none; the names; the file's SHA-256).

    Every labelled face must exist in the version's faces: unknown ones are listed, not dropped."""
    location = storage.parse_location(path)
    data = storage.read_small_file(location, storage.arrow_filesystem(location, endpoint), "labels file", path)
    try:
        if path.lower().endswith(".csv"):
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(pa.BufferReader(data))
        else:
            table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"labels file {path} could not be parsed (CSV or Parquet with image_id, face_index, name): {exc}") from exc
    missing = [c for c in ("image_id", "face_index", "name") if c not in table.column_names]
    if missing:
        raise ConfigError(f"labels file {path} lacks column(s) {', '.join(missing)} (it has {', '.join(table.column_names)}); "
                          "it needs image_id, face_index, name")
    try:
        face_index = pc.cast(table["face_index"], pa.int32())
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"labels file {path}: face_index must be whole numbers ({exc})") from exc
    names = pc.cast(table["name"], pa.string())
    if table["image_id"].null_count or face_index.null_count or names.null_count:
        raise ConfigError(f"labels file {path} has empty image_id, face_index or name values")
    keys = _face_keys(table["image_id"], face_index)
    face_keys = _face_keys(faces["image_id"], faces["face_index"])
    position = pc.index_in(keys, value_set=face_keys)
    unknown = pc.filter(keys, pc.is_null(position)).to_pylist()
    if unknown:
        shown = ", ".join(f"{k.split(chr(31))[0]}#{k.split(chr(31))[1]}" for k in unknown[:10])
        raise ConfigError(f"labels file {path} names {len(unknown)} face(s) that are not in the index: {shown}"
                          + (" ..." if len(unknown) > 10 else ""))
    name_list = sorted(set(names.to_pylist()))
    code_of = {n: i for i, n in enumerate(name_list)}
    codes = np.full(faces.num_rows, -1, np.int64)
    rows = position.to_numpy(zero_copy_only=False).astype(np.int64)
    label_codes = np.array([code_of[n] for n in names.to_pylist()], np.int64)
    conflict = {}
    for row, code in zip(rows, label_codes):
        if codes[row] not in (-1, code):
            conflict[row] = code
        codes[row] = code
    if conflict:
        row = next(iter(conflict))
        raise ConfigError(f"labels file {path} gives face {faces['image_id'][row]}#{faces['face_index'][row]} two names")
    return codes, name_list, hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------- run


@dataclass
class PeopleSummary:
    run_id: str
    pipeline_version: str
    record: dict[str, Any]


def new_run_id() -> str:
    import uuid

    return "people-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def _person_ids(start: int, count: int) -> list[str]:
    return [f"p{n:07d}" for n in range(start, start + count)]


def _quality(faces: pa.Table) -> np.ndarray:
    """Cover-face ranking: a confident, large, frontal face."""
    score = faces["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    size = np.minimum(faces["face_size"].to_numpy(zero_copy_only=False).astype(np.float64), 150.0) / 150.0
    yaw = np.abs(np.nan_to_num(faces["yaw"].to_numpy(zero_copy_only=False).astype(np.float64)))
    return np.nan_to_num(score * size * (1.0 - yaw), nan=0.0)


def _knn_graph(config: PeopleConfig, x: np.ndarray, ray_address: str | None):
    from . import clustering

    use_ray = config.knn == "ray" or (config.knn == "auto" and (len(x) >= RAY_KNN_MIN_FACES or ray_address
                                                                 or os.environ.get("RAY_ADDRESS")))
    if not use_ray or len(x) < 2:
        return clustering.knn(x, min(config.k, max(1, len(x) - 1))), "local"
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    return clustering.knn_distributed(x, min(config.k, len(x) - 1)), "ray"


# Below this many faces one process builds the kNN graph faster than Ray can start tasks.
RAY_KNN_MIN_FACES = 200_000


def run_people(config: PeopleConfig, ray_address: str | None = None) -> PeopleSummary:
    from .lease import Lease

    config.validate()
    # One writer per OUT: not while an index run or a compaction changes the faces it reads.
    out = Out.from_uri(config.out, config.endpoint())
    with Lease(out, holder=f"facebatch people ({config.run_id or 'new run'})"):
        return _run_people(config, out, ray_address)


def _run_people(config: PeopleConfig, out: Out, ray_address: str | None = None) -> PeopleSummary:
    from . import clustering

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    endpoint = config.endpoint()
    run_id = config.run_id or new_run_id()
    if not run_id.startswith("people-"):
        run_id = "people-" + run_id  # recovery tells people runs from index runs by this prefix
    recovered = recover_staging(out)

    t0 = time.perf_counter()
    version, faces = _faces_of_version(out, config.pipeline_version)
    x = _embedding_matrix(faces["embedding"])
    n = faces.num_rows
    image_keys = pc.dictionary_encode(faces["image_id"].combine_chunks()).indices.to_numpy().astype(np.int64)
    face_run_id = faces["run_id"].combine_chunks()
    reasons = config.quality.reasons(faces)
    passing = np.array([r is None for r in reasons], bool)

    previous = out.people_generations().get(version)
    # Labels survive later runs: without --labels, the file the last run used is read again.
    labels_path = config.labels or (previous or {}).get("labels")
    names = np.full(n, -1, np.int64)
    name_list: list[str] = []
    labels_sha = None
    if labels_path:
        names, name_list, labels_sha = read_labels(labels_path, faces, endpoint)
        passing |= names >= 0  # a labelled face is clustered whatever its quality figures
        reasons[names >= 0] = None

    full = config.full or previous is None
    forced_full = False
    if not full and previous.get("labels_sha256") != labels_sha:
        full, forced_full = True, True  # new or changed names: every person may change
    seconds["select"] = time.perf_counter() - t0

    # person_of[i]: index into person_ids (-1 = none); assigned_by / similarity per face.
    person_of = np.full(n, -1, np.int64)
    assigned_by = np.full(n, None, dtype=object)
    person_ids: list[str] = []
    person_names: list[str | None] = []
    prev_people: dict[str, dict] = {}
    next_person = 1
    if previous is not None:
        next_person = int(previous.get("next_person", 1))
        prev_table = _read_generation_table(out, previous, "people",
                                            columns=["person_id", "name", "num_faces", "first_run_id", "last_run_id"])
        prev_people = {row["person_id"]: row for row in prev_table.to_pylist()}

    counts = {"faces": n, "filtered": int((~passing).sum())}
    knn_where = None
    t0 = time.perf_counter()
    if full:
        candidates = np.flatnonzero(passing)
        graph, knn_where = _knn_graph(config, x[candidates], ray_address)
        seconds["knn"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        labels = clustering.cluster(x[candidates], image_keys[candidates], threshold=config.threshold, k=config.k,
                                    min_size=config.min_size, names=names[candidates], knn_graph=graph)
        cluster_count = int(labels.max()) + 1 if len(labels) else 0
        cluster_ids = np.full(cluster_count, None, dtype=object)
        if previous is not None:
            # Old ids keep their meaning: each new cluster takes the old person it overlaps most
            # (largest overlaps first, each old id at most once).
            prev_fp = _read_generation_table(out, previous, "face_people",
                                             columns=["image_id", "face_index", "person_id"])
            prev_person = pc.index_in(_face_keys(faces["image_id"], faces["face_index"]),
                                      value_set=_face_keys(prev_fp["image_id"], prev_fp["face_index"]))
            prev_rows = prev_person.to_numpy(zero_copy_only=False)
            old_pid = np.full(n, None, dtype=object)
            found = ~np.isnan(prev_rows.astype(np.float64))
            old_pid_values = np.asarray(prev_fp["person_id"].to_pylist(), dtype=object)
            old_pid[found] = old_pid_values[prev_rows[found].astype(np.int64)]
            pairs: dict[tuple[int, str], int] = {}
            for c, pid in zip(labels, old_pid[candidates]):
                if c >= 0 and pid is not None:
                    pairs[(int(c), pid)] = pairs.get((int(c), pid), 0) + 1
            taken: set[str] = set()
            for (c, pid), _count in sorted(pairs.items(), key=lambda kv: -kv[1]):
                if cluster_ids[c] is None and pid not in taken:
                    cluster_ids[c] = pid
                    taken.add(pid)
        for c in range(cluster_count):
            if cluster_ids[c] is None:
                cluster_ids[c] = _person_ids(next_person, 1)[0]
                next_person += 1
        person_ids = list(cluster_ids)
        person_of[candidates] = labels
        assigned_by[candidates[labels >= 0]] = "cluster"
        counts.update(clustered=int((labels >= 0).sum()), new_persons=sum(1 for p in person_ids if p not in prev_people),
                      assigned_to_existing=0, new_faces=n)
    else:
        # Incremental: faces already placed keep their person; new ones go to the nearest person.
        prev_fp = _read_generation_table(out, previous, "face_people",
                                         columns=["image_id", "face_index", "person_id", "assigned_by", "face_run_id"])
        same_face = _face_keys(prev_fp["image_id"], prev_fp["face_index"])
        position = pc.index_in(_face_keys(faces["image_id"], faces["face_index"]), value_set=same_face)
        pos = position.to_numpy(zero_copy_only=False).astype(np.float64)
        known = ~np.isnan(pos)
        pos_i = np.where(known, pos, 0).astype(np.int64)
        prev_run = np.asarray(prev_fp["face_run_id"].to_pylist(), dtype=object)
        # A re-indexed photo has new face rows (new run_id): its faces count as new.
        known &= prev_run[pos_i] == np.asarray(face_run_id.to_pylist(), dtype=object)
        prev_pid = np.asarray(prev_fp["person_id"].to_pylist(), dtype=object)[pos_i]
        prev_by = np.asarray(prev_fp["assigned_by"].to_pylist(), dtype=object)[pos_i]
        placed = known & (prev_pid != None)  # noqa: E711 (object array comparison)
        person_ids = sorted({p for p in prev_pid[placed]} | set(prev_people))
        index_of = {p: i for i, p in enumerate(person_ids)}
        person_of[placed] = [index_of[p] for p in prev_pid[placed]]
        assigned_by[placed] = prev_by[placed]
        new = ~known
        counts["new_faces"] = int(new.sum())
        if not new.any() and int(known.sum()) == prev_fp.num_rows:
            # Nothing new, nothing gone: the current generation stays as it is (no new files).
            seconds["total"] = time.perf_counter() - t_start
            record = {"run_id": run_id, "kind": "people", "pipeline_version": version, "out": config.out,
                      "mode": "unchanged", "faces": {**counts, "persons": len(prev_people), "unassigned": None},
                      "current_run_id": previous["run_id"], "seconds": seconds, "recovered_runs": recovered,
                      "state": "nothing to do", "finished_at": time.time()}
            out.write_json(out.run_record(run_id), record)
            return PeopleSummary(run_id=run_id, pipeline_version=version, record=record)
        new_ok = np.flatnonzero(new & passing)
        assigned = np.zeros(0, np.int64)
        if len(new_ok) and len(person_ids):
            _, cents = clustering.centroids(x, person_of)
            centroid_rows = np.unique(person_of[person_of >= 0])
            person_row, _sim = clustering.assign(x[new_ok], cents, config.threshold, image_keys_new=image_keys[new_ok])
            target = np.where(person_row >= 0, centroid_rows[np.maximum(person_row, 0)], -1)
            # Cannot-link with the faces already placed: a photo never gives one person two faces.
            taken = set(zip(image_keys[placed].tolist(), person_of[placed].tolist()))
            clash = np.array([(int(k), int(t)) in taken for k, t in zip(image_keys[new_ok], target)], bool) if len(target) else np.zeros(0, bool)
            target[clash] = -1
            ok = target >= 0
            assigned = new_ok[ok]
            person_of[assigned] = target[ok]
            assigned_by[assigned] = "incremental"
        counts["assigned_to_existing"] = int(len(assigned))
        seconds["assign"] = time.perf_counter() - t0
        # The pool: passing faces without a person (new ones that matched no one, older leftovers).
        t0 = time.perf_counter()
        pool = np.flatnonzero(passing & (person_of < 0))
        new_persons = 0
        if len(pool) >= config.min_size:
            graph, knn_where = _knn_graph(config, x[pool], ray_address)
            seconds["knn"] = time.perf_counter() - t0
            labels = clustering.cluster(x[pool], image_keys[pool], threshold=config.threshold, k=config.k,
                                        min_size=config.min_size, names=names[pool], knn_graph=graph)
            new_persons = int(labels.max()) + 1 if len(labels) else 0
            fresh = _person_ids(next_person, new_persons)
            next_person += new_persons
            base = len(person_ids)
            person_ids.extend(fresh)
            members = labels >= 0
            person_of[pool[members]] = base + labels[members]
            assigned_by[pool[members]] = "cluster"
        counts.update(new_persons=new_persons, pool=int(len(pool)))
    if len(names) and (names >= 0).any():
        assigned_by[(names >= 0) & (person_of >= 0)] = "label"
    seconds["cluster"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- tables
    t0 = time.perf_counter()
    used = np.unique(person_of[person_of >= 0])
    uniq, cents = clustering.centroids(x, person_of)
    cent_of = {int(u): cents[i] for i, u in enumerate(uniq)}
    similarity = np.full(n, np.nan, np.float32)
    members_all = np.flatnonzero(person_of >= 0)
    if len(members_all):
        similarity[members_all] = np.einsum("ij,ij->i", x[members_all], cents[np.searchsorted(uniq, person_of[members_all])])
    quality = _quality(faces)
    for i in range(len(person_names), len(person_ids)):
        person_names.append(None)
    people_rows = []
    order = np.argsort(person_of, kind="stable")
    bounds = np.searchsorted(person_of[order], used)
    ends = np.searchsorted(person_of[order], used, side="right")
    image_ids = faces["image_id"].to_pylist()
    face_indexes = faces["face_index"].to_numpy(zero_copy_only=False)
    for p, lo, hi in zip(used.tolist(), bounds, ends):
        member = order[lo:hi]
        pid = person_ids[p]
        best = member[int(np.argmax(quality[member]))]
        name_codes = names[member]
        name_codes = name_codes[name_codes >= 0]
        name = name_list[int(np.bincount(name_codes).argmax())] if len(name_codes) else None
        if name is None and not full and pid in prev_people:
            name = prev_people[pid]["name"]
        prev = prev_people.get(pid)
        changed = prev is None or int(prev["num_faces"]) != len(member)
        people_rows.append({
            "person_id": pid,
            "name": name,
            "num_faces": len(member),
            "num_images": int(len(np.unique(image_keys[member]))),
            "cover_image_id": image_ids[best],
            "cover_face_index": int(face_indexes[best]),
            "centroid": cent_of[p].tolist(),
            "first_run_id": prev["first_run_id"] if prev else run_id,
            "last_run_id": run_id if changed else prev["last_run_id"],
            "pipeline_version": version,
        })
    people = pa.Table.from_pylist(people_rows, schema=PEOPLE_SCHEMA) if people_rows else PEOPLE_SCHEMA.empty_table()
    people = people.sort_by("person_id")

    reason_out = np.where(person_of >= 0, None, np.where(reasons == None, "no_match", reasons))  # noqa: E711
    pid_array = np.asarray(person_ids + [None], dtype=object)[np.where(person_of >= 0, person_of, len(person_ids))]
    face_people = pa.table(
        {
            "image_id": faces["image_id"],
            "face_index": faces["face_index"],
            "person_id": pa.array(pid_array.tolist(), pa.string()),
            "similarity": pa.array(similarity, pa.float32()),
            "assigned_by": pa.array(assigned_by.tolist(), pa.string()),
            "reason": pa.array(reason_out.tolist(), pa.string()),
            "face_run_id": face_run_id,
            "people_run_id": pa.array([run_id] * n, pa.string()),
            "pipeline_version": pa.array([version] * n, pa.string()),
        },
        schema=FACE_PEOPLE_SCHEMA,
    )
    seconds["tables"] = time.perf_counter() - t0

    # Every face is searchable, the filtered ones too; vector i = row i of face_people.
    t0 = time.perf_counter()
    index_bytes = clustering.save_index(clustering.build_search_index(x)) if n else b""
    seconds["search_index"] = time.perf_counter() - t0

    counts.update(persons=people.num_rows, unassigned=int((person_of < 0).sum()),
                  named_persons=int(pc.sum(pc.is_valid(people["name"])).as_py() or 0) if people.num_rows else 0)
    record = {
        "run_id": run_id,
        "kind": "people",
        "pipeline_version": version,
        "out": config.out,
        "mode": "full" if full else "incremental",
        "full_because_labels_changed": forced_full,
        "faces": counts,
        "knn": knn_where,
        "config": {**asdict(config), "quality": asdict(config.quality)},
        "labels_sha256": labels_sha,
        "search_index_bytes": len(index_bytes),
        "recovered_runs": recovered,
    }
    t0 = time.perf_counter()
    stage_and_publish(out, run_id, version, people, face_people, index_bytes, record, previous, next_person,
                      labels_path, labels_sha, seconds, t_start)
    seconds["publish"] = time.perf_counter() - t0
    record["seconds"] = {**seconds, "total": time.perf_counter() - t_start}
    return PeopleSummary(run_id=run_id, pipeline_version=version, record=record)


# ----------------------------------------------------------------------------------------- publish


def stage_and_publish(out: Out, run_id: str, version: str, people: pa.Table, face_people: pa.Table,
                      index_bytes: bytes, record: dict, previous: dict | None, next_person: int,
                      labels_path: str | None, labels_sha: str | None, seconds: dict, t_start: float) -> None:
    fs = out.fs
    staging = out.staging(run_id)
    heartbeat = Heartbeat.start(out, run_id)
    try:
        relative = {
            "people": f"people/{run_id}.parquet",
            "face_people": f"face_people/{run_id}.parquet",
            "search_index": f"_search/{run_id}.faiss",
        }
        finals = {name: out.join(rel) for name, rel in relative.items()}
        staged = {name: staging.join(f"{name}.{final.path.rsplit('.', 1)[-1]}") for name, final in finals.items()}
        pq.write_table(people, staged["people"].fs_path(), filesystem=fs, compression="zstd")
        pq.write_table(face_people, staged["face_people"].fs_path(), filesystem=fs, compression="zstd",
                       row_group_size=100_000, write_statistics=True)
        with fs.open_output_stream(staged["search_index"].fs_path()) as fh:
            fh.write(index_bytes)
        fault_point("people-staged")
        pointer = {
            "run_id": run_id,
            "pipeline_version": version,
            "files": relative,
            "next_person": next_person,
            "labels": labels_path,
            "labels_sha256": labels_sha,
            "committed_at": time.time(),
        }
        old = sorted(out.join(rel).fs_path() for rel in set((previous or {}).get("files", {}).values()) - set(relative.values()))
        record = dict(record, seconds={**seconds, "total": time.perf_counter() - t_start})
        journal = {
            "version": version,
            "add": [{"staged": staged[name].fs_path(), "final": finals[name].fs_path()} for name in finals],
            "pointer": pointer,
            "remove": old,
            "record": record,
        }
        # Writing the journal is the point of no return: from here the next run finishes the swap.
        swap.write_journal(out, swap.PEOPLE, run_id, journal)
        fault_point("people-journal")
        swap.finish_swap(out, swap.PEOPLE, run_id, heartbeat)
    finally:
        heartbeat.stop()



# ----------------------------------------------------------------------------------------- search


@dataclass
class SearchIndex:
    """One version's committed search index with the face -> person map it was built with."""

    version: str
    index: Any
    image_id: list[str]
    face_index: np.ndarray
    person_id: list[str | None]
    names: dict[str, str | None]
    load_seconds: float

    @classmethod
    def load(cls, out_uri: str, version: str | None = None, endpoint: str | None = None) -> "SearchIndex":
        from . import clustering

        t0 = time.perf_counter()
        out = Out.from_uri(out_uri, storage.endpoint_url(endpoint))
        generations = out.people_generations()
        if not generations:
            raise ConfigError(f"{out_uri} has no people/search index yet: run `facebatch people {out_uri}` first")
        if version is None:
            version = max(generations, key=lambda v: generations[v].get("committed_at", 0))
        elif version not in generations:
            raise ConfigError(f"{out_uri} has no search index for pipeline version {version!r} (it has {', '.join(generations)})")
        pointer = generations[version]
        data = storage.read_small_file(out.generation_file(pointer, "search_index"), out.fs, "search index")
        index = clustering.load_index(data) if data else None
        fp = _read_generation_table(out, pointer, "face_people", ["image_id", "face_index", "person_id"])
        people = _read_generation_table(out, pointer, "people", ["person_id", "name"])
        return cls(
            version=version,
            index=index,
            image_id=fp["image_id"].to_pylist(),
            face_index=fp["face_index"].to_numpy(zero_copy_only=False),
            person_id=fp["person_id"].to_pylist(),
            names=dict(zip(people["person_id"].to_pylist(), people["name"].to_pylist())),
            load_seconds=time.perf_counter() - t0,
        )

    def query(self, embeddings: np.ndarray, top_k: int = 20, min_similarity: float = -1.0,
              exclude_image_ids: set[str] | None = None) -> list[list[dict]]:
        """Per query embedding, the most similar indexed faces (best first)."""
        from . import clustering

        if self.index is None or len(embeddings) == 0:
            return [[] for _ in range(len(embeddings))]
        # Ask for more when some results will be excluded.
        extra = 0 if not exclude_image_ids else 16 + 4 * len(exclude_image_ids)
        sims, idx = clustering.search(self.index, np.ascontiguousarray(embeddings, np.float32), min(top_k + extra, len(self.image_id)))
        results = []
        for row_sims, row_idx in zip(sims, idx):
            matches = []
            for s, i in zip(row_sims.tolist(), row_idx.tolist()):
                if i < 0 or s < min_similarity:
                    continue
                image_id = self.image_id[i]
                if exclude_image_ids and image_id in exclude_image_ids:
                    continue
                pid = self.person_id[i]
                matches.append({"image_id": image_id, "face_index": int(self.face_index[i]), "similarity": round(float(s), 6),
                                "person_id": pid, "name": self.names.get(pid) if pid else None})
                if len(matches) == top_k:
                    break
            results.append(matches)
        return results


def persons_of(matches: list[dict], threshold: float = COSINE_THRESHOLD) -> list[dict]:
    """The persons among a query face's matches at or above the same-person threshold."""
    best: dict[str, dict] = {}
    for m in matches:
        if m["person_id"] is None or m["similarity"] < threshold:
            continue
        entry = best.setdefault(m["person_id"], {"person_id": m["person_id"], "name": m["name"], "similarity": m["similarity"], "faces": 0})
        entry["faces"] += 1
        entry["similarity"] = max(entry["similarity"], m["similarity"])
    return sorted(best.values(), key=lambda e: -e["similarity"])
