"""bench/bench_pipeline.py's CPU accounting: whose CPU seconds they are, and that a process
which has ended (an actor Ray Data let go before the last results) keeps its time."""

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_pipeline import CpuAccount  # noqa: E402

BURN = """
import time
start = time.process_time()
while time.process_time() - start < 0.6:
    pass
time.sleep(0.5)  # long enough for the account's sampler to see the whole burn
"""


def test_cpu_account_groups_by_command_line_and_keeps_ended_processes():
    account = CpuAccount(interval=0.05)
    # Ray names an inference actor's process after its class; the extra argument stands for that.
    child = subprocess.Popen([sys.executable, "-c", BURN, "ray::MapWorker(MapBatches(FaceModelActor))"])
    child.wait()  # gone from the process tree from here on
    start = time.process_time()
    while time.process_time() - start < 0.3:  # the driver's own share
        pass
    account.take("end")
    account.stop()
    _, at_start = account.snapshots["start"]
    _, at_end = account.snapshots["end"]
    actors = at_end["inference actors"] - at_start.get("inference actors", 0.0)
    assert 0.55 <= actors <= 1.5, actors
    assert at_end["driver"] - at_start["driver"] >= 0.3
    lines = account.table()
    assert "end" in lines[0]
    assert any(line.strip().startswith("inference actors") for line in lines)
