"""Training under `accelerate launch` with two real CPU processes (gloo DDP)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_two_cpu_processes(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "samed2_kit.cli",
           "quickstart", "--out", str(out), "train.steps=3", "train.batch_size=2",
           "train.warmup_steps=1"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # the main process built the store, the other reused it; only the main one wrote the run folder
    assert r.stdout.count("building store") == 1 and r.stdout.count("using store") == 1
    assert r.stdout.count("run folder:") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["overall"]["n"] == 13
    assert "x 2 process(es)" in metrics["info"]["training"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-store"]
