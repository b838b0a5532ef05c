"""Every ```sql block of the README runs against a real index built by the pipeline (demo archive)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDER_ID = "s3://my-archive/photos/2024/06/IMG_0412.jpg"
PLACEHOLDER_OUT = "s3://my-index/faces-v1"


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory, ray_local):
    from facebatch.config import IndexConfig
    from facebatch.demo import build_demo_archive
    from facebatch.pipeline import run_index

    root = tmp_path_factory.mktemp("demo")
    build_demo_archive(root)
    summary = run_index(IndexConfig(source=str(root / "archive"), out=str(root / "tables"), max_side=1024, batch_size=4).validate(),
                        progress=False)
    return root, summary


def sql_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_promised_queries():
    text = "\n".join(sql_blocks())
    for needle in ("num_faces", "getvariable('image_id')", "array_cosine_similarity", "list_cosine_similarity", "pipeline_version", "GROUP BY status"):
        assert needle in text


@pytest.mark.parametrize("index", range(len(sql_blocks())))
def test_readme_query_runs(demo_index, index):
    import duckdb

    root, summary = demo_index
    out = root / "tables"
    probe_id = str(root / "archive" / "portraits" / "astronaut.jpg")
    sql = sql_blocks()[index].replace(PLACEHOLDER_OUT, str(out)).replace(PLACEHOLDER_ID, probe_id)
    con = duckdb.connect()
    for name in ("images", "faces"):
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{out}/{name}/*.parquet')")
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    result = None
    for statement in statements:
        if statement.upper().startswith("CREATE VIEW"):
            statement = statement.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1)
        result = con.execute(statement)
    if statements[-1].upper().startswith("CREATE"):
        return
    rows = result.fetchall()
    assert rows, sql
    if "cosine_similarity" in sql:
        # The same astronaut appears in the other demo photos: the best match is her, at high similarity.
        best = rows[0]
        assert best[0] != probe_id and best[-1] > 0.9, rows[:3]
