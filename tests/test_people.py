"""`facebatch people` and `facebatch search` on the shared identity photos, indexed for real.

The index is built once (`facebatch index` over a manifest of the identity photos plus one photo
of two of their persons together); the people tests work on copies of it, or on copies that hold
only part of its faces (to play nightly runs that each bring new photos).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from facebatch import evaluation
from facebatch.people import PeopleConfig, SearchIndex, run_people
from facebatch.query import connect

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TOGETHER = "detection/face_recognition/obama_and_biden.jpg"


def _cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "facebatch.cli", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def identity_index(shared_data, shared_manifest, tmp_path_factory):
    """(OUT, truth): the identity photos indexed by `facebatch index`; truth maps image_id -> person."""
    root = tmp_path_factory.mktemp("identity")
    faces_root = shared_data / "faces"
    truth = {str(faces_root / f["path"]): f["labels"].get("person") for f in shared_manifest["files"] if f["set"] == "identity"}
    manifest = root / "photos.csv"
    manifest.write_text("uri\n" + "\n".join(sorted([*truth, str(faces_root / TOGETHER)])) + "\n")
    out = root / "index"
    run = _cli("index", str(manifest), "--out", str(out), "--object-store-memory", str(300 * 2**20))
    assert run.returncode == 0, run.stderr[-4000:]
    return out, {k: v for k, v in truth.items() if v}


def _copy(out: Path, dst: Path) -> Path:
    shutil.copytree(out, dst)
    return dst


def _largest_face_predictions(out: Path, truth: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted person code, true person code) of the largest face of every labelled photo."""
    con = connect(str(out))
    rows = con.execute(
        """SELECT f.image_id, fp.person_id FROM faces f JOIN face_people fp USING (image_id, face_index)
           QUALIFY row_number() OVER (PARTITION BY f.image_id ORDER BY (f.box[3] - f.box[1]) * (f.box[4] - f.box[2]) DESC) = 1"""
    ).fetchall()
    rows = [(image_id, pid) for image_id, pid in rows if image_id in truth]
    assert len(rows) >= 110
    persons = {p: i for i, p in enumerate(sorted({pid for _, pid in rows if pid}))}
    names = {n: i for i, n in enumerate(sorted(set(truth.values())))}
    pred = np.array([persons[pid] if pid else -1 for _, pid in rows])
    true = np.array([names[truth[image_id]] for image_id, _ in rows])
    return pred, true


def _assignments(out: Path) -> dict[tuple[str, int], str | None]:
    con = connect(str(out))
    return {(i, f): p for i, f, p in con.execute("SELECT image_id, face_index, person_id FROM face_people").fetchall()}


# ------------------------------------------------------------------------------------------ clustering


def test_defaults_group_the_identity_photos_into_their_persons(identity_index, tmp_path):
    out = _copy(identity_index[0], tmp_path / "out")
    summary = run_people(PeopleConfig(out=str(out)))
    assert summary.record["mode"] == "full"
    pred, true = _largest_face_predictions(out, identity_index[1])
    precision, recall, f = evaluation.bcubed(pred, true)
    pairwise = evaluation.pairwise_f(pred, true)
    print(f"identity photos: BCubed P {precision:.4f} R {recall:.4f} F {f:.4f}; pairwise P/R/F {pairwise}")
    assert precision >= 0.98 and f >= 0.99, (precision, recall, f, pairwise)
    con = connect(str(out))
    # Never two faces of one photo in one person.
    assert con.execute("SELECT count(*) FROM (SELECT person_id, image_id FROM face_people WHERE person_id IS NOT NULL "
                       "GROUP BY ALL HAVING count(*) > 1)").fetchone()[0] == 0
    # Every face of the version has exactly one face_people row; unassigned ones say why.
    assert con.execute("SELECT count(*) FROM faces").fetchone() == con.execute("SELECT count(*) FROM face_people").fetchone()
    reasons = dict(con.execute("SELECT coalesce(reason, 'assigned'), count(*) FROM face_people GROUP BY 1").fetchall())
    assert set(reasons) <= {"assigned", "low_score", "small_face", "profile", "blurred", "no_match"}
    assert con.execute("SELECT count(*) FROM face_people WHERE (person_id IS NULL) <> (reason IS NOT NULL)").fetchone()[0] == 0
    # The people table agrees with face_people; centroids are unit vectors; covers are members.
    rows = con.execute("""SELECT p.person_id, p.num_faces, count(fp.image_id), p.num_images, count(DISTINCT fp.image_id),
                                 list_dot_product(p.centroid, p.centroid), bool_or(fp.image_id = p.cover_image_id AND fp.face_index = p.cover_face_index)
                          FROM people p JOIN face_people fp USING (person_id) GROUP BY ALL""").fetchall()
    assert rows and all(r[1] == r[2] and r[3] == r[4] and abs(r[5] - 1) < 1e-4 and r[6] for r in rows)
    record = json.loads((out / "_runs" / f"{summary.run_id}.json").read_text())
    assert record["state"] == "published" and record["faces"]["persons"] == len(rows)
    assert {"select", "knn", "cluster", "publish"} <= set(record["seconds"]) | {"publish"}


def test_readme_people_queries_run(identity_index, tmp_path):
    out = _copy(identity_index[0], tmp_path / "out")
    run_people(PeopleConfig(out=str(out)))
    blocks = re.findall(r"```sql people\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    con = connect(str(out))
    biggest = con.execute("SELECT person_id FROM people ORDER BY num_faces DESC, person_id LIMIT 1").fetchone()[0]
    for sql in blocks:
        sql = sql.replace("'p0000001'", f"'{biggest}'")
        result = None
        for statement in [s.strip() for s in sql.split(";") if s.strip()]:
            result = con.execute(statement)
        rows = result.fetchall()
        assert rows, sql
    # The photo of Obama and Biden together makes them the pair seen together most often.
    together = [b for b in blocks if "appear together" in b or "together" in b.lower()]
    assert together


# ------------------------------------------------------------------------------------------ labels


def test_labels_name_persons_and_split_contradicted_clusters(identity_index, tmp_path):
    out = _copy(identity_index[0], tmp_path / "out")
    truth = identity_index[1]
    con = connect(str(out))
    faces = con.execute("SELECT image_id, face_index FROM faces WHERE face_index = 0 ORDER BY image_id").fetchall()
    by_person: dict[str, list[str]] = {}
    for image_id, _ in faces:
        if image_id in truth:
            by_person.setdefault(truth[image_id], []).append(image_id)
    salley, savage = by_person["John_Salley"], by_person["John_Savage"]
    labels = tmp_path / "labels.csv"
    # Two faces of one person, one of another, and one face of Salley's photos called someone else.
    labels.write_text("image_id,face_index,name\n"
                      f"{salley[0]},0,John Salley\n{salley[1]},0,John Salley\n{savage[0]},0,John Savage\n"
                      f"{salley[2]},0,Impostor\n")
    run_people(PeopleConfig(out=str(out), labels=str(labels)))
    assignments = _assignments(out)
    names = dict(connect(str(out)).execute("SELECT person_id, name FROM people").fetchall())
    salley_person = assignments[(salley[0], 0)]
    assert names[salley_person] == "John Salley" and assignments[(salley[1], 0)] == salley_person
    assert names[assignments[(savage[0], 0)]] == "John Savage"
    # The contradicting label splits the cluster: that face is its own named person.
    impostor = assignments[(salley[2], 0)]
    assert impostor != salley_person and names[impostor] == "Impostor"
    # The rest of Salley's photos still join the labelled person.
    rest = [assignments[(i, 0)] for i in salley[3:]]
    assert sum(p == salley_person for p in rest) >= len(rest) - 1
    by = dict(connect(str(out)).execute("SELECT image_id, assigned_by FROM face_people WHERE face_index = 0").fetchall())
    assert by[salley[0]] == "label" and by[salley[3]] == "cluster"

    # Labels survive a full recluster.
    run_people(PeopleConfig(out=str(out), labels=str(labels), full=True))
    after = _assignments(out)
    names = dict(connect(str(out)).execute("SELECT person_id, name FROM people").fetchall())
    assert names[after[(salley[0], 0)]] == "John Salley" and after[(salley[0], 0)] == salley_person


def test_bad_labels_files_fail_with_the_reason(identity_index, tmp_path):
    out = _copy(identity_index[0], tmp_path / "out")
    missing_column = tmp_path / "a.csv"
    missing_column.write_text("image_id,name\nx,y\n")
    run = _cli("people", str(out), "--labels", str(missing_column))
    assert run.returncode == 2 and "lacks column(s) face_index" in run.stderr
    unknown = tmp_path / "b.csv"
    unknown.write_text("image_id,face_index,name\n/nowhere/a.jpg,0,A\n/nowhere/b.jpg,3,B\n")
    run = _cli("people", str(out), "--labels", str(unknown))
    assert run.returncode == 2 and "2 face(s) that are not in the index" in run.stderr and "/nowhere/b.jpg#3" in run.stderr
    assert not (out / "_people").exists()


def test_bad_arguments_exit_2(identity_index, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = _cli("people", str(empty))
    assert run.returncode == 2 and "holds no index" in run.stderr
    run = _cli("people", str(identity_index[0]), "--pipeline-version", "v9-nope")
    assert run.returncode == 2 and "pipeline version 'v9-nope' is not in" in run.stderr
    run = _cli("people", str(identity_index[0]), "--threshold", "1.5")
    assert run.returncode == 2 and "threshold" in run.stderr
    run = _cli("search", str(REPO / "README.md"), "--index", str(empty))
    assert run.returncode == 2 and "no people/search index" in run.stderr


# ------------------------------------------------------------------------------------------ nightly runs


def _subset_index(source: Path, dst: Path, nights: list[list[str]]) -> list[Path]:
    """A copy of the index whose images/faces rows arrive in nights (one file pair per night).

    Returns the folders to copy in night by night: night 0 is in place at once."""
    images = pq.read_table(next((source / "images").glob("*.parquet")))
    faces = pq.read_table(next((source / "faces").glob("*.parquet")))
    (dst / "images").mkdir(parents=True)
    (dst / "faces").mkdir()
    pending = []
    for night, ids in enumerate(nights):
        value_set = pa.array(sorted(ids))
        run_id = f"night{night}"
        im = images.filter(pc.is_in(images["image_id"], value_set=value_set))
        fa = faces.filter(pc.is_in(faces["image_id"], value_set=value_set))
        im = im.set_column(im.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * im.num_rows))
        fa = fa.set_column(fa.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * fa.num_rows))
        folder = dst.parent / f"{dst.name}-night{night}"
        (folder / "images").mkdir(parents=True)
        (folder / "faces").mkdir()
        pq.write_table(im, folder / "images" / f"{run_id}.parquet")
        pq.write_table(fa, folder / "faces" / f"{run_id}.parquet")
        pending.append(folder)
    return pending


def _bring_night(folder: Path, out: Path) -> None:
    for table in ("images", "faces"):
        for f in (folder / table).glob("*.parquet"):
            shutil.copy(f, out / table / f.name)


def test_nightly_runs_place_new_faces_and_keep_ids(identity_index, tmp_path):
    source, truth = identity_index
    ids = sorted(pq.read_table(next((source / "images").glob("*.parquet")), columns=["image_id"])["image_id"].to_pylist())
    rng = np.random.default_rng(7)
    shuffled = list(rng.permutation(ids))
    cut1, cut2 = int(0.7 * len(ids)), int(0.85 * len(ids))
    out = tmp_path / "out"
    nights = _subset_index(source, out, [shuffled[:cut1], shuffled[cut1:cut2], shuffled[cut2:]])
    _bring_night(nights[0], out)
    first = run_people(PeopleConfig(out=str(out)))
    assert first.record["mode"] == "full"
    history = [_assignments(out)]
    for night in nights[1:]:
        _bring_night(night, out)
        summary = run_people(PeopleConfig(out=str(out)))
        assert summary.record["mode"] == "incremental"
        counts = summary.record["faces"]
        assert counts["new_faces"] > 0 and counts["new_faces"] == counts["faces"] - len(history[-1])
        now = _assignments(out)
        # No existing person_id changes meaning: every face placed before keeps its person.
        for key, pid in history[-1].items():
            if pid is not None:
                assert now[key] == pid, key
        history.append(now)
    assert counts["assigned_to_existing"] > 0
    incremental_f = evaluation.bcubed(*_largest_face_predictions(out, truth))[2]

    full_out = _copy(out, tmp_path / "full")
    run_people(PeopleConfig(out=str(full_out), full=True))
    full_f = evaluation.bcubed(*_largest_face_predictions(full_out, truth))[2]
    print(f"BCubed F: incremental (70% + 15% + 15%) {incremental_f:.4f}, one full run {full_f:.4f}")
    assert incremental_f >= full_f - 0.02 and incremental_f >= 0.97

    # A rerun with nothing new changes nothing: no new generation is published.
    pointer = next((out / "_people").glob("*.json")).read_text()
    again = run_people(PeopleConfig(out=str(out)))
    assert again.record["mode"] == "unchanged"
    assert next((out / "_people").glob("*.json")).read_text() == pointer
    assert _assignments(out) == history[-1]


# ------------------------------------------------------------------------------------------ crash safety


@pytest.mark.parametrize("fault", ["people-staged", "people-journal", "people-after-move", "people-after-pointer"])
def test_killed_during_publish_leaves_old_or_new_and_the_rerun_completes(identity_index, tmp_path, fault):
    source, _ = identity_index
    ids = sorted(pq.read_table(next((source / "images").glob("*.parquet")), columns=["image_id"])["image_id"].to_pylist())
    out = tmp_path / "out"
    nights = _subset_index(source, out, [ids[::2], ids[1::2]])
    _bring_night(nights[0], out)
    run_people(PeopleConfig(out=str(out)))
    old = _assignments(out)
    _bring_night(nights[1], out)
    reference = _copy(out, tmp_path / "reference")
    run_people(PeopleConfig(out=str(reference)))
    new = _assignments(reference)

    killed = _cli("people", str(out), env={"FACEBATCH_FAULT_POINT": fault})
    assert killed.returncode == -9, killed.stderr[-2000:]
    visible = _assignments(out)
    assert visible in (old, new), "a mix of two generations is visible"
    con = connect(str(out))
    assert con.execute("SELECT count(*) FROM people").fetchone()[0] == con.execute(
        "SELECT count(DISTINCT person_id) FROM face_people WHERE person_id IS NOT NULL").fetchone()[0]

    rerun = _cli("people", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _assignments(out) == new
    assert not list((out / "_staging").glob("people-*"))
    # Only the current generation's files remain.
    pointer = json.loads(next((out / "_people").glob("*.json")).read_text())
    for table in ("people", "face_people"):
        assert sorted(f"{table}/{p.name}" for p in (out / table).glob("*.parquet")) == [pointer["files"][table]]


# ------------------------------------------------------------------------------------------ search


def test_search_finds_the_person_in_the_other_photos(identity_index, tmp_path):
    out = _copy(identity_index[0], tmp_path / "out")
    truth = identity_index[1]
    run_people(PeopleConfig(out=str(out)))
    index = SearchIndex.load(str(out))
    con = connect(str(out))
    rows = con.execute(
        """SELECT image_id, embedding FROM faces
           QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY (box[3] - box[1]) * (box[4] - box[2]) DESC) = 1"""
    ).fetchall()
    counts: dict[str, int] = {}
    for image_id, _ in rows:
        if image_id in truth:
            counts[truth[image_id]] = counts.get(truth[image_id], 0) + 1
    # Photos without a person label (a mirrored copy, the photo of two persons together, an
    # unlabelled still) cannot be scored: they are left out of the results.
    unlabelled = {image_id for image_id, _ in rows if image_id not in truth}
    hits = total = 0
    for image_id, embedding in rows:
        if image_id not in truth or counts[truth[image_id]] < 2:
            continue
        # Against the index of the others: the photo's own faces are left out of the results.
        matches = index.query(np.asarray([embedding], np.float32), top_k=1, exclude_image_ids={image_id} | unlabelled)[0]
        total += 1
        hits += bool(matches) and truth.get(matches[0]["image_id"]) == truth[image_id]
    print(f"search: own person at rank 1 for {hits}/{total} photos")
    assert total >= 100 and hits / total >= 0.95


def test_search_command_answers_photos_and_reports_unreadable_ones(identity_index, shared_data, tmp_path):
    out = _copy(identity_index[0], tmp_path / "out")
    run_people(PeopleConfig(out=str(out)))
    probe = shared_data / "faces" / "detection" / "face_recognition" / "obama.jpg"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    run = _cli("search", str(probe), str(broken), str(tmp_path / "missing.jpg"), "--index", str(out), "--json", "--top-k", "5")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(probe), str(broken), str(tmp_path / "missing.jpg")]
    answer = lines[0]
    assert answer["error"] is None and answer["faces"]
    best = answer["faces"][0]
    assert len(best["matches"]) == 5 and best["matches"][0]["similarity"] >= best["matches"][-1]["similarity"]
    obama = {k for k, v in identity_index[1].items() if v == "obama"}
    assert best["matches"][0]["image_id"] in obama and best["persons"]
    assert best["persons"][0]["person_id"] == best["matches"][0]["person_id"]
    assert lines[1]["error"] and lines[2]["error"].startswith("unreadable")
    # Nothing answered at all: exit 1.
    run = _cli("search", str(broken), "--index", str(out))
    assert run.returncode == 1 and "error" in run.stdout
