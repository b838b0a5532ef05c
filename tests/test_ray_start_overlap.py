"""A run imports ray.data on a thread while ray.init starts a local Ray (pipeline.import_ray_data_alongside).

That is safe only while no module is imported by both threads at once: the modules both need are
loaded first (pipeline.IMPORTED_BY_RAY_INIT_AND_RAY_DATA). This checks that list against the
installed Ray, each side in a fresh interpreter, so that a Ray upgrade that changes either side's
imports fails here instead of, rarely, in a user's run."""

import json
import os
import subprocess
import sys

_NEW_MODULES = """
import json, sys
import facebatch.pipeline as pipeline
import ray
import importlib
for name in pipeline.IMPORTED_BY_RAY_INIT_AND_RAY_DATA:  # as import_ray_data_alongside does first
    importlib.import_module(name)
before = set(sys.modules)
{body}
print(json.dumps(sorted(set(sys.modules) - before)))
"""

_RAY_START = """
pipeline.start_ray(None, 100 * 1024 * 1024)
try:
    ray.cluster_resources(), ray.nodes()
finally:
    ray.shutdown()
"""


def _modules_loaded_by(body: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", _NEW_MODULES.format(body=body)], env=env, capture_output=True,
                         text=True, timeout=180, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_ray_init_and_ray_data_import_no_module_in_common_once_the_shared_ones_are_loaded():
    by_init = _modules_loaded_by(_RAY_START)
    by_ray_data = _modules_loaded_by("import ray.data")
    assert "ray.data" in by_ray_data and len(by_init) > 50  # each side really imported something
    shared = sorted(by_init & by_ray_data)
    assert not shared, ("imported by both after the modules loaded first; add them to "
                        f"pipeline.IMPORTED_BY_RAY_INIT_AND_RAY_DATA: {shared}")


def test_a_failed_import_on_the_thread_raises_in_the_callers_own_import(tmp_path):
    # A ray.data that cannot be imported: the thread swallows its error, the caller's import raises it.
    fake = tmp_path / "ray" / "data"
    fake.mkdir(parents=True)
    (tmp_path / "ray" / "__init__.py").write_text("")
    (tmp_path / "ray" / "dashboard.py").write_text("")
    (tmp_path / "ray" / "_common" / "usage").mkdir(parents=True)
    for package in ("_common", "_common/usage"):
        (tmp_path / "ray" / package / "__init__.py").write_text("")
    (tmp_path / "ray" / "_common" / "usage" / "usage_lib.py").write_text("")
    (fake / "__init__.py").write_text("raise ImportError('ray.data is broken here')\n")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from facebatch.pipeline import import_ray_data_alongside\n"
        "import_ray_data_alongside().join()\n"
        "assert 'ray.data' not in sys.modules\n"
        "try:\n"
        "    import ray.data\n"
        "except ImportError as exc:\n"
        "    print('raised:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert "raised: ray.data is broken here" in out.stdout
    assert "Traceback" not in out.stderr  # the thread itself printed nothing
