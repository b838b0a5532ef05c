"""What a run pays before its first results, measured on a local Ray instance:

1. building the run's input dataset from N plan blocks (16 rows of S3-like keys each) both ways
   `facebatch.pipeline.input_dataset` can: `ray.data.from_arrow_refs` (one remote metadata task
   per block) and `ray.data.from_blocks` (metadata computed in the driver), the seconds of each;
2. a bare Ray actor that imports what the inference actor imports (ray.data, torch,
   facebatch.pipeline): seconds until it answers, and each import's seconds inside it;
3. what a wave costs (`facebatch.pipeline.WAVE_BLOCKS`: a large plan runs as several datasets one
   after the other, and the actor pool drains and restarts between them): `run_index` over the
   demo archive (9 files) at batch 2, i.e. 6 input blocks, in one wave and in waves of 2 blocks
   (tiny waves: a full wave's `from_blocks` set-up is part 1's seconds for 20,000 blocks).

    .venv/bin/python bench/bench_run_start.py [--blocks 11,1250,5000] [--settle 8]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa

import benchlib


def plan_tables(n: int) -> list[pa.Table]:
    return [pa.table({"image_id": [f"{i:08x}{j:032x}" for j in range(16)],
                      "uri": [f"s3://bucket/archive/2024/06/photo_{i:07d}_{j:02d}.jpg" for j in range(16)],
                      "etag": [f"{i * 16 + j:032x}" for j in range(16)], "size": list(range(16))})
            for i in range(n)]


def main() -> None:
    parser = benchlib.parser(__doc__)
    parser.add_argument("--blocks", default="11,1250,5000")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds to wait after ray.init (Ray's own processes start)")
    args = parser.parse_args()
    import ray

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    print(f"ray.init {time.perf_counter() - t0:.2f} s")
    import ray.data

    time.sleep(args.settle)
    print(f"{'blocks':>7} {'from_arrow_refs s':>18} {'from_blocks s':>14}")
    for n in (int(b) for b in args.blocks.split(",")):
        tables = plan_tables(n)
        t0 = time.perf_counter()
        ray.data.from_arrow_refs([ray.put(t) for t in tables])
        refs_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.data.from_blocks(tables)
        blocks_s = time.perf_counter() - t0
        print(f"{n:7d} {refs_s:18.2f} {blocks_s:14.2f}")

    @ray.remote(num_cpus=1)
    class Importer:
        def __init__(self, modules):
            import importlib

            self.seconds = {}
            for module in modules:
                t = time.perf_counter()
                importlib.import_module(module)
                self.seconds[module] = time.perf_counter() - t

        def ready(self):
            return self.seconds

    for modules in ([], ["ray.data", "torch", "facebatch.pipeline"]):
        t0 = time.perf_counter()
        actor = Importer.remote(modules)
        seconds = ray.get(actor.ready.remote())
        ready_s = time.perf_counter() - t0
        imports = ", ".join(f"{m} {s:.2f} s" for m, s in seconds.items()) or "nothing imported"
        print(f"actor ready after {ready_s:.2f} s ({imports})")
        ray.kill(actor)
        time.sleep(2)

    from facebatch import pipeline
    from facebatch.config import IndexConfig
    from facebatch.demo import build_demo_archive

    root = Path(tempfile.mkdtemp(prefix="facebatch-bench-waves-"))
    build_demo_archive(root)
    seconds: dict[int, list[float]] = {}
    # Each setting twice, in the order one, several, several, one: neither gains from going first.
    for run, wave_blocks in enumerate((pipeline.WAVE_BLOCKS, 2, 2, pipeline.WAVE_BLOCKS)):
        pipeline.WAVE_BLOCKS = wave_blocks
        t0 = time.perf_counter()
        summary = pipeline.run_index(IndexConfig(source=str(root / "archive"), out=str(root / f"tables-{run}"),
                                                 max_side=1024, batch_size=2).validate(), progress=False)
        waves = summary.record["input_waves"]
        seconds.setdefault(waves, []).append(time.perf_counter() - t0)
        print(f"demo archive, {summary.record['processed']} files in {waves} wave(s): {seconds[waves][-1]:.2f} s")
    (one, one_s), (many, many_s) = sorted((waves, sum(s) / len(s)) for waves, s in seconds.items())
    print(f"each wave after the first: {(many_s - one_s) / (many - one):.2f} s (means of two runs each)")
    ray.shutdown()


if __name__ == "__main__":
    main()
