"""Smoke test of benchmarks/profile_step.py: XLA:CPU's per-operation profile of the step."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_attributes_the_attack_convolutions(tmp_path):
    out = tmp_path / "profile.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"),
         "--model", "small_cnn", "--batch-size", "8", "--attack-steps", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["where"], r["kind"], r["direction"]): r["seconds"] for r in report["breakdown"]}
    # The attack's forward and input-gradient convolutions run in its loop,
    # the training pass's once.
    assert rows[("attack", "convolution", "forward")] > 0
    assert rows[("attack", "convolution", "backward")] > 0
    assert any(w == "update" and k == "convolution" for w, k, _ in rows)
    total = sum(rows.values())
    assert abs(total - report["operations_s"]) <= 1e-9 * max(1.0, total)
    # Operations may overlap (independent ones run on different threads), so
    # their sum is not bounded by the wall time.
    assert report["operations_s"] > 0 and report["step_s"] > 0
    assert "| attack | convolution |" in proc.stdout


def test_bad_arguments_exit_2():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"),
         "--model", "resnet9000"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "accepted" in proc.stderr
