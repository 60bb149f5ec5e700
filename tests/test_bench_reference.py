"""benchmarks/bench_reference.py without the reference code: it says so and exits 0; a folder
missing the reference files is named with what it lacks (the timing itself needs the
huginn-0125 modelling code, which is not part of rdp and is not downloaded)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_reference.py"


def test_skips_without_reference_dir_and_names_missing_files(tmp_path):
    skipped = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0
    assert skipped.stdout.startswith("bench_reference: skipped: give --reference-dir DIR")
    (tmp_path / "raven_config_minimal.py").write_text("")
    missing = subprocess.run([sys.executable, str(SCRIPT), "--reference-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"bench_reference: {tmp_path} lacks raven_modeling_minimal.py"
