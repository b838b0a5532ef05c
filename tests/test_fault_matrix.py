"""The storage fault matrix: the S3 requests that publish, recovery, compaction and the people
job's publish make, failed one at a time, one kind at a time, through the fault-injecting proxy in
front of the loopback S3 server (moto_server). No Ray, no detector: staged runs are written with
`writing.RunWriter`, people generations with `people.stage_and_publish`.

Scenarios (each from one starting state, copied server-side into a fresh OUT prefix per case):
- publish: run-0 published (images a, b, c); run-1 staged (b changed, d new) -> `publish_run`.
- recovery: the same, plus run-2 that died while writing (no READY) -> `recover_staging`
  publishes run-1 and discards run-2.
- compaction: three published runs -> `compact.compact` (merge, journal, `swap.finish_swap`).
- people: generation people-1 committed -> `people.stage_and_publish` of people-2 (staged files,
  journal, `swap.finish_swap`: moves, the pointer, deleting people-1's files).

A clean run of each scenario is recorded through the proxy: op (GET, HEAD, PUT, POST = multipart
create/complete, COPY, DELETE incl. batch deletes, LIST) + key of every request, in order. A case
fails exactly one of those requests (the n-th with that op and key; a compaction id in a key
matches any id), with one kind:
- lasting: 403 AccessDenied, 500 InternalError, 503 SlowDown or a dropped connection, to that
  request and every later request with the same op and key (so the client's retries fail too).
  The step either still succeeds or raises StorageError / OSError / RuntimeError.
- passing: 503, 500 or a dropped connection, to that one request only. With
  FACEBATCH_S3_MAX_ATTEMPTS=2 (one retry in pyarrow and boto3; our small JSON reads retry once
  too) the step must *succeed* and end exactly like a clean run.

After a lasting fault, what a reader sees through `facebatch.query.connect` (DuckDB; people
through their pointer, index tables through the staged state of a half-done publish or
compaction) is checked at once: all four tables (images, faces, people, face_people) are the old
ones or all are the new ones: never a mix, never a duplicated row. Then the next clean run
(recovery; `compact` again; the people run again) must end with the tables of an uninterrupted
run and nothing left under _staging.

Which cases run:
- default: every (op x fault kind) of every step at least once. Lasting: per op that the step
  makes, each of 403, 500, 503 and dropped once, at a position chosen deterministically: the op's
  first request, its last one, and two drawn from those in between with a fixed seed
  (FAULT_MATRIX_SEED=n draws others); which kind gets which position turns from op to op, and a
  repeat (e.g. pyarrow's second HEAD of a file, the n-th GET of a row group) is a position like
  any other. Passing: per kind (503, 500, dropped), one case in which every distinct request
  fails once. Recovery's own publish_run requests are the publish step's and are left to it
  (its COPY, PUT and POST are all publish_run's). That is 112 cases: publish 31 (7 ops),
  recovery 19 (4 ops), compaction 31 (7 ops), people 31 (7 ops), run 4 at a time (WORKERS). (The
  selection before this one, every distinct request once, ran 154.)
- FAULT_MATRIX=full: every recorded request x 4 lasting kinds + 3 passing kinds, one request at a
  time: 253 requests, about 1800 cases.
The summary printed at the end (pytest -s) gives the number of cases per scenario, op and kind,
and the slowest cases.
"""

from __future__ import annotations

import os
import queue
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import count

import pyarrow as pa
import pytest

import facebatch.out as out_module
from facebatch import publishing, recovery, storage, writing
from facebatch.out import Out
from faulty_proxy import DROP, FaultyS3Proxy
from test_tables_plan import _faces_rows, _images_rows

BUCKET = "fault-matrix"
VERSION = "v1-test"
KIND_NAMES = {403: "403", 500: "500", 503: "503", DROP: "dropped"}
COMPACTION_ID = re.compile(r"compact-\d{8}T\d{6}Z-[0-9a-f]{6}")
_case_numbers = count()


# --------------------------------------------------------------------------- fixtures


# Cases run this many at a time, each worker through its own proxy (so its own boto3 clients,
# whose adaptive retry mode slows a client down after throttling). A case is its own OUT prefix,
# its faults match only keys under it: cases cannot see each other. Most of a case's time is
# waiting (the clients' retry back-off, moto_server), not this process's CPU: 3m41s of CPU in
# 13m26s when the cases ran one at a time.
WORKERS = int(os.environ.get("FAULT_MATRIX_WORKERS") or 4)


@pytest.fixture(scope="module")
def env(s3_server):
    """One proxy per worker; one S3 attempt retried once (pyarrow and boto3), our own small
    JSON reads retried once too, so that a fault that lasts fails fast and one that does not is
    survived."""
    s3_server.client().create_bucket(Bucket=BUCKET)
    proxies = [FaultyS3Proxy(s3_server.endpoint) for _ in range(WORKERS)]
    saved = os.environ.get("FACEBATCH_S3_MAX_ATTEMPTS"), out_module.READ_JSON_ATTEMPTS
    os.environ["FACEBATCH_S3_MAX_ATTEMPTS"] = "2"
    out_module.READ_JSON_ATTEMPTS = 2
    try:
        yield proxies, s3_server
    finally:
        for proxy in proxies:
            proxy.stop()
        out_module.READ_JSON_ATTEMPTS = saved[1]
        if saved[0] is None:
            os.environ.pop("FACEBATCH_S3_MAX_ATTEMPTS", None)
        else:
            os.environ["FACEBATCH_S3_MAX_ATTEMPTS"] = saved[0]


def fresh_out(scenario: str) -> storage.Location:
    return storage.parse_location(f"s3://{BUCKET}/{scenario}-{next(_case_numbers):05d}")


def fresh_clients(endpoint: str | None = None) -> None:
    """boto3's adaptive retry mode slows a client down after throttling: each case starts afresh
    (a worker clears only the clients of its own proxy)."""
    for key in [k for k in list(storage._clients) if endpoint is None or k[1] == endpoint]:
        storage._clients.pop(key, None)


# --------------------------------------------------------------------------- building states (direct, not through the proxy)


def stage_run(out, run_id, images, faces, ep, record=True):
    """A run that wrote all its rows (READY, and its record unless record=False) and was not published."""
    writer = writing.RunWriter(Out(out, ep), run_id)
    if faces:
        writer.write("faces", _faces_table(faces, run_id))
    writer.write("images", _images_rows([i for i, _ in images], [e for _, e in images], ["ok"] * len(images), VERSION, run_id))
    writer.close()
    writer.heartbeat.stop()
    if record:
        writer.out.write_json(out.join("_staging", run_id, "record.json"), {"run_id": run_id})


def _faces_table(faces, run_id):
    """faces: [(image_id, number of faces)] -> rows with face_index 0..n-1 and a score that tells runs apart."""
    ids = [i for i, n in faces for _ in range(n)]
    table = _faces_rows(ids, VERSION, run_id)
    index = [k for _, n in faces for k in range(n)]
    score = [0.9 if run_id.endswith("0") else 0.95] * len(ids)
    return table.set_column(1, "face_index", pa.array(index, pa.int32())).set_column(3, "score", pa.array(score, pa.float32()))


def publish_run(out, run_id, images, faces, ep):
    stage_run(out, run_id, images, faces, ep)
    publishing.publish_run(Out(out, ep), run_id, {"run_id": run_id})


RUN0_IMAGES = [("a", "e0"), ("b", "e0"), ("c", "e0")]
RUN0_FACES = [("a", 2), ("b", 1), ("c", 1)]
# run-1 replaces b (changed: one face more) and adds d.
RUN1_IMAGES = [("b", "e1"), ("d", "e1")]
RUN1_FACES = [("b", 2), ("d", 1)]


def setup_publish(out, ep):
    publish_run(out, "run-0", RUN0_IMAGES, RUN0_FACES, ep)
    stage_run(out, "run-1", RUN1_IMAGES, RUN1_FACES, ep)


def act_publish(out, ep):
    publishing.publish_run(Out(out, ep), "run-1", {"run_id": "run-1"})


def setup_recovery(out, ep):
    """run-1 finished writing and its driver died; run-2 died while writing (no READY): recovery
    publishes the first and discards the second."""
    setup_publish(out, ep)
    at = Out(out, ep)
    at.write_json(out.join("_staging", "run-2", "HEARTBEAT"), {"host": "gone", "pid": 1, "time": 0})
    with at.fs.open_output_stream(out.join("_staging", "run-2", "images.parquet").fs_path()) as fh:
        fh.write(b"partial")


def act_recovery(out, ep):
    recovery.recover_staging(Out(out, ep))


def setup_compaction(out, ep):
    publish_run(out, "run-0", RUN0_IMAGES, RUN0_FACES, ep)
    publish_run(out, "run-1", [("d", "e1"), ("e", "e1")], [("d", 1), ("e", 3)], ep)
    publish_run(out, "run-2", [("f", "e2")], [("f", 1)], ep)


def act_compaction(out, ep):
    from facebatch.compact import compact

    compact(Out(out, ep))


def _people_generation(run_id, persons):
    from facebatch.tables import FACE_PEOPLE_SCHEMA, PEOPLE_SCHEMA

    people = pa.Table.from_pylist([
        {"person_id": pid, "name": None, "num_faces": len(faces), "num_images": len(faces), "cover_image_id": faces[0][0],
         "cover_face_index": faces[0][1], "centroid": [1.0] + [0.0] * 127, "first_run_id": run_id, "last_run_id": run_id,
         "pipeline_version": VERSION} for pid, faces in persons.items()], schema=PEOPLE_SCHEMA)
    face_people = pa.Table.from_pylist(sorted(
        ({"image_id": i, "face_index": k, "person_id": pid, "similarity": 0.99, "assigned_by": "cluster", "reason": None,
          "face_run_id": "run-0", "people_run_id": run_id, "pipeline_version": VERSION}
         for pid, faces in persons.items() for i, k in faces), key=lambda r: (r["image_id"], r["face_index"])), schema=FACE_PEOPLE_SCHEMA)
    return people, face_people


PEOPLE_1 = {"p0000000": [("a", 0), ("b", 0)], "p0000001": [("a", 1), ("c", 0)]}
PEOPLE_2 = {"p0000000": [("a", 0), ("b", 0), ("c", 0)], "p0000001": [("a", 1)]}


def _stage_people(out, run_id, persons, ep):
    from facebatch.people import stage_and_publish

    people, face_people = _people_generation(run_id, persons)
    at = Out(out, ep)
    previous = at.people_generations().get(VERSION)
    stage_and_publish(at, run_id, VERSION, people, face_people, f"faiss:{run_id}".encode(), {"run_id": run_id, "kind": "people"},
                      previous, len(persons), None, None, {}, time.perf_counter())


def setup_people(out, ep):
    publish_run(out, "run-0", RUN0_IMAGES, RUN0_FACES, ep)
    _stage_people(out, "people-1", PEOPLE_1, ep)


def act_people(out, ep):
    _stage_people(out, "people-2", PEOPLE_2, ep)


def next_index_run(out, ep):
    recovery.recover_staging(Out(out, ep))


def next_people_run(out, ep):
    recovery.recover_staging(Out(out, ep))
    if Out(out, ep).people_generations()[VERSION]["run_id"] != "people-2":
        act_people(out, ep)  # the failed run left nothing committed: the next people run does it again


SCENARIOS = {
    "publish": (setup_publish, act_publish, next_index_run),
    "recovery": (setup_recovery, act_recovery, next_index_run),
    "compaction": (setup_compaction, act_compaction, act_compaction),
    "people": (setup_people, act_people, next_people_run),
}


# --------------------------------------------------------------------------- what a reader sees


COLUMNS = {
    "images": "image_id, pipeline_version, etag, run_id",
    "faces": "image_id, pipeline_version, face_index, run_id, score",
    "people": "person_id, pipeline_version, num_faces, last_run_id",
    "face_people": "image_id, face_index, person_id, people_run_id",
}


_duckdb: dict[tuple, object] = {}
_direct_clients: dict[int, object] = {}
_direct_lock = threading.Lock()


def direct_client(s3):
    """A boto3 client straight to the server, one per thread (creating clients is not thread-safe)."""
    with _direct_lock:
        client = _direct_clients.get(threading.get_ident())
        if client is None:
            client = _direct_clients[threading.get_ident()] = s3.client()
    return client


def visible(out, ep) -> dict[str, list[tuple]]:
    """The rows of every table as `facebatch.query.connect(OUT)` shows them (one DuckDB connection
    per endpoint, its views recreated over what OUT holds now; no metadata caching in DuckDB)."""
    from facebatch.query import connect, create_views

    key = (ep, threading.get_ident())  # a DuckDB connection is used by one thread at a time
    con = _duckdb.get(key)
    if con is None:
        con = _duckdb[key] = connect(Out(out, ep))
    else:
        create_views(con, Out(out, ep))
    return {name: sorted(con.sql(f"SELECT {cols} FROM {name}").fetchall()) for name, cols in COLUMNS.items()}


def clone(s3, template, out) -> None:
    """Start a case from the scenario's starting state: a server-side copy of every object."""
    client = direct_client(s3)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=template.path + "/")
    for item in listed.get("Contents", []):
        key = out.path + item["Key"][len(template.path):]
        client.copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": item["Key"]})


def staged_leftovers(s3, out) -> list[str]:
    listed = direct_client(s3).list_objects_v2(Bucket=BUCKET, Prefix=out.join("_staging").path + "/")
    return sorted(o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("/"))


def check_between(seen, old, new) -> str:
    """What a reader sees while a step failed half way: all tables the old ones, or all the new
    ones; never a mix (not even across tables), never a row twice. Returns which."""
    for name, rows in seen.items():
        assert len(rows) == len(set(rows)), f"{name}: duplicated rows {rows}"
    if seen == old:
        return "old"
    if seen == new:
        return "new"
    mixed = {name: rows for name, rows in seen.items() if rows not in (old[name], new[name])}
    raise AssertionError(f"a mix of old and new: {mixed or 'tables from different states'}")


def normalise(key: str, prefix: str) -> str:
    """'/bucket/<case prefix>/x' -> 'x', a compaction id -> a placeholder (keys of a batch delete one by one)."""
    return " ".join(COMPACTION_ID.sub("compact-ID", k[len(prefix):] if k.startswith(prefix) else k) for k in key.split(" "))


def key_pattern(normalised: str, prefix: str) -> str:
    parts = [re.escape(prefix + k).replace("compact\\-ID", COMPACTION_ID.pattern) for k in normalised.split(" ")]
    return " ".join(parts)


# --------------------------------------------------------------------------- the matrix


PERSISTENT = (403, 500, 503, DROP)
TRANSIENT = (503, 500, DROP)  # the kinds every client retries


def _full() -> bool:
    return os.environ.get("FAULT_MATRIX") == "full"


# The default selection's sample of request positions is drawn with this seed (FAULT_MATRIX_SEED
# draws another one, to explore; a failure names the case, and the seed reproduces it).
DEFAULT_SEED = 20261130


def _seed() -> int:
    return int(os.environ.get("FAULT_MATRIX_SEED") or DEFAULT_SEED)


def positions(requests, op, scenario, covered=frozenset()):
    """Where a lasting fault hits an `op` request, one position per lasting kind: the op's first
    and last request, then two drawn (seeded) from those in between. Requests that another
    scenario covers are left to it."""
    occurrences, seen = [], Counter()
    for index, (o, key) in enumerate(requests):
        if o == op:
            occurrences.append((index, key, seen[(o, key)]))
        seen[(o, key)] += 1
    own = [r for r in occurrences if (op, r[1]) not in covered]
    first, last, middle = own[0], own[-1], own[1:-1]
    sample = random.Random(f"{_seed()}-{scenario}-{op}").sample(middle, min(2, len(middle)))
    picks = [first, last, *sample] if len(own) > 1 else [first]
    return (picks * len(PERSISTENT))[:len(PERSISTENT)]  # few requests of this op: kinds share one


def select_cases(requests, scenario="", covered=frozenset()):
    """The cases to run: (label, [(op, key, skip), ...] the requests to fail, status, times).

    FAULT_MATRIX=full: every recorded request x (4 lasting kinds + 3 passing kinds), one request
    at a time.
    Default: every (op x kind) of this step at least once:
    - lasting: per op, each of 403, 500, 503 and dropped once, at the op's first request, its last
      one and two seeded draws from those in between; which kind gets which position turns with
      the op (so every kind meets a first and a last request somewhere);
    - passing: per kind (503, 500, dropped), one case in which *every* distinct request fails
      once (its first occurrence; the client's retry succeeds): stronger than one at a time for
      the retry configuration, and 3 cases instead of hundreds.
    """
    cases = []
    if _full():
        seen_before: Counter = Counter()
        for index, (op, key) in enumerate(requests):
            skip = seen_before[(op, key)]
            seen_before[(op, key)] += 1
            for status in PERSISTENT:
                cases.append((f"#{index} {op} {key} {KIND_NAMES[status]} lasting", [(op, key, skip)], status, None))
            for status in TRANSIENT:
                cases.append((f"#{index} {op} {key} {KIND_NAMES[status]} once", [(op, key, skip)], status, 1))
        return cases
    # An op all of whose requests another scenario covers (recovery's COPY, PUT and POST are its
    # publish_run's) is left to that scenario.
    own_ops = {op for op, key in requests if (op, key) not in covered}
    ops = [op for op in dict.fromkeys(op for op, _ in requests) if op in own_ops]
    for op_number, op in enumerate(ops):
        picks = positions(requests, op, scenario, covered)
        for kind_number, status in enumerate(PERSISTENT):
            index, key, skip = picks[(kind_number + op_number) % len(PERSISTENT)]
            repeat = f" (repeat {skip})" if skip else ""
            cases.append((f"#{index} {op} {key}{repeat} {KIND_NAMES[status]} lasting", [(op, key, skip)], status, None))
    # (recovery's own publish_run requests are the publish scenario's: left to it here too)
    distinct = list(dict.fromkeys((op, key, 0) for op, key in requests if (op, key) not in covered))
    for status in TRANSIENT:
        cases.append((f"every distinct request ({len(distinct)}) fails once: {KIND_NAMES[status]}", distinct, status, 1))
    return cases


def _run_scenario(env, scenario):
    proxies, s3 = env
    proxy = proxies[0]  # records the clean run
    setup, act, next_run = SCENARIOS[scenario]
    direct = s3.endpoint
    fresh_clients()

    # The old state, the new state (an uninterrupted run) and the requests that run makes.
    template = fresh_out(scenario)
    setup(template, direct)
    if scenario in ("publish", "recovery"):
        # Before run-1 was staged: run-0's tables. (Once run-1's record is staged the run is
        # committed, and readers through connect() see it whole even before it is published.)
        before_run1 = fresh_out(scenario)
        publish_run(before_run1, "run-0", RUN0_IMAGES, RUN0_FACES, direct)
        old = visible(before_run1, direct)
    out = fresh_out(scenario)
    clone(s3, template, out)
    if scenario not in ("publish", "recovery"):
        old = visible(out, direct)
    before = len(proxy.operations)
    act(out, proxy.endpoint)
    prefix = f"/{BUCKET}/{out.path}/"
    requests = [(op, normalise(key, prefix)) for op, key in proxy.operations[before:]]
    new = visible(out, direct)
    assert (new != old or scenario == "compaction") and not staged_leftovers(s3, out)

    covered = set()
    if scenario == "recovery" and not _full():
        # Recovery publishes run-1 with publish_run: those requests are the publish scenario's.
        before = len(proxy.operations)
        publish_template = fresh_out("publish")
        setup_publish(publish_template, direct)
        act_publish(publish_template, proxy.endpoint)
        covered = {(op, normalise(key, f"/{BUCKET}/{publish_template.path}/")) for op, key in proxy.operations[before:]}
    cases = select_cases(requests, scenario, covered)

    if os.environ.get("FAULT_MATRIX_LIMIT"):  # development only: the first n cases
        cases = cases[: int(os.environ["FAULT_MATRIX_LIMIT"])]
    summary: Counter = Counter()
    outcomes: Counter = Counter()
    states: Counter = Counter()  # what readers saw after a lasting fault: the old or the new tables
    phases: Counter = Counter()
    slowest: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    failures: list[str] = []  # every failing case is reported, not only the first

    def run_case(case, targets, status, times, proxy):
        """One case through `proxy` (one worker's); returns (seconds by phase, outcome, state)."""
        phases: Counter = Counter()
        state = None
        out = fresh_out(scenario)
        fresh_clients(proxy.endpoint)
        tick = time.perf_counter()
        clone(s3, template, out)
        phases["clone"] += time.perf_counter() - tick
        prefix = f"/{BUCKET}/{out.path}/"
        faults = [proxy.inject(op, status=status, times=times, pattern=key_pattern(key, prefix), skip=skip)
                  for op, key, skip in targets]
        error = None
        tick = time.perf_counter()
        try:
            act(out, proxy.endpoint)
        except Exception as exc:  # noqa: BLE001 - which error it is, is checked below
            error = exc
        finally:
            proxy.clear_faults()
        phases["act"] += time.perf_counter() - tick
        unfired = [t for t, f in zip(targets, faults) if not f.served]
        assert not unfired, f"{case}: fault(s) never fired (the run's requests changed?): {unfired[:5]}"
        tick = time.perf_counter()
        seen = visible(out, direct)
        phases["visible"] += time.perf_counter() - tick
        if times == 1:
            # One failure of a kind the clients retry: survived, and the result is a clean run's.
            assert error is None, f"{case}: a single retryable failure was not survived: {error!r}"
            assert seen == new and not staged_leftovers(s3, out), case
            outcome = "transient survived"
        else:
            try:
                state = check_between(seen, old, new)
            except AssertionError as exc:
                raise AssertionError(f"{case}: {exc}") from exc
            outcome = "step failed" if error is not None else "step succeeded anyway"
            if error is not None and not isinstance(error, (storage.StorageError, OSError, RuntimeError)):
                raise AssertionError(f"{case}: unexpected error type {error!r}") from error
            fresh_clients(proxy.endpoint)
            tick = time.perf_counter()
            next_run(out, proxy.endpoint)
            phases["next run"] += time.perf_counter() - tick
            assert visible(out, direct) == new, f"{case}: the next run did not end like an uninterrupted run"
            assert not staged_leftovers(s3, out), f"{case}: staged files left: {staged_leftovers(s3, out)}"
        return phases, outcome, state

    free = queue.Queue()
    for worker_proxy in proxies:
        free.put(worker_proxy)

    def on_a_free_proxy(case, targets, status, times):
        worker_proxy = free.get()
        started = time.perf_counter()
        try:
            return run_case(case, targets, status, times, worker_proxy), time.perf_counter() - started
        finally:
            free.put(worker_proxy)

    with ThreadPoolExecutor(len(proxies)) as pool:
        futures = [(f"{scenario} {label}", targets, status, times, pool.submit(on_a_free_proxy, f"{scenario} {label}", targets, status, times))
                   for label, targets, status, times in cases]
        for case, targets, status, times, future in futures:
            try:
                (case_phases, outcome, state), case_seconds = future.result()
            except Exception as exc:  # noqa: BLE001 - every failing case is listed at the end
                failures.append(str(exc) if isinstance(exc, AssertionError) else f"{case}: {exc!r}")
                print(f"\n[fault matrix] FAILED {failures[-1]}", flush=True)
                continue
            phases.update(case_phases)
            outcomes[outcome] += 1
            if state is not None:
                states[state] += 1
            for op, _, _ in targets:
                summary[(op, KIND_NAMES[status], "once" if times else "lasting")] += 1
            slowest = sorted([*slowest, (case_seconds, case)], reverse=True)[:5]
    seconds = time.perf_counter() - t0
    print("\n[fault matrix] seconds by phase:", {k: round(v, 1) for k, v in phases.items()})
    print("[fault matrix] slowest cases:", "; ".join(f"{case} {s:.1f} s" for s, case in slowest))
    assert not failures, f"{len(failures)} of {len(cases)} {scenario} cases failed:\n" + "\n".join(failures)
    return requests, cases, summary, outcomes, states, seconds


RESULTS: dict[str, tuple] = {}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fault_matrix(env, scenario):
    requests, cases, summary, outcomes, states, seconds = _run_scenario(env, scenario)
    RESULTS[scenario] = (len(requests), len(cases), outcomes, states, seconds)
    ops = Counter(op for op, _ in requests)
    print(f"\n[fault matrix] {scenario}: {len(requests)} requests ({dict(ops)}), {len(cases)} cases in {seconds:.1f} s; "
          f"{dict(outcomes)}; after a lasting fault readers saw {dict(states)}")
    for (op, kind, mode), n in sorted(summary.items()):
        print(f"    {op:6s} {kind:8s} {mode:10s} {n}")


def test_fault_matrix_summary():
    """Printed last: the number of cases that ran (pytest -s shows it)."""
    if not RESULTS:
        pytest.skip("no scenario ran")
    total = sum(r[1] for r in RESULTS.values())
    print(f"\n[fault matrix] {total} cases over {sum(r[0] for r in RESULTS.values())} recorded requests: "
          + ", ".join(f"{s} {r[1]} ({r[0]} requests, {r[4]:.0f} s)" for s, r in RESULTS.items()))
