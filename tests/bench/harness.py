"""Running the peer harness (``python -m bench.peers``) on a tiny model, as the bench tests do."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_peers(model, peers: str, settings: str, data_dir, tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """Run the harness on one window of 64 tokens and 2 calibration windows; (command, results file). Asserts
    that it exits cleanly."""
    out = tmp_path / "peers.json"
    cmd = [sys.executable, "-m", "bench.peers", "--model", str(model), "--peers", peers, "--settings", settings,
           "--max-windows", "1", "--seqlen", "64", "--calib-windows", "2", "--data-dir", str(data_dir),
           "--work-dir", str(tmp_path / "work"), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "SENSIQUANT_DATA_DIR": str(data_dir)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cmd, out
