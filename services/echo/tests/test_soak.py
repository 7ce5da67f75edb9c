"""The soak at CI size: 1,000 concurrent framed connections, random frames of 0-1000 KiB in
random write splits, twice against one server process (``make soak`` runs it bigger); and
the memory of the burst handed back afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[3] / "bench" / "soak.py"


def test_a_thousand_connections_byte_exact_counted_and_nothing_left_behind() -> None:
    res = subprocess.run(
        [sys.executable, str(SOAK), "--connections", "1000", "--frames", "2", "--largest-kib",
         "1000", "--rounds", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = json.loads(res.stdout)
    assert res.returncode == 0, (report, res.stderr[-2000:])
    # What soak.py checked, restated here so that this test names it.
    assert report["connections"] == 1000
    assert report["failed_connections"] == 0
    assert report["server_received_bytes"] == report["bytes_sent"] > 1000 * 2 * 200_000
    assert report["server_sent_bytes"] == report["bytes_received"] == report["bytes_sent"]
    assert report["server_frames"] == 2 * 1000 * 2
    assert report["server_connections_active"] == 0
    assert [r["fds_after"] for r in report["rounds"]] == [report["fds_before"]] * 2
    assert report["rounds"][1]["rss_after_mib"] - report["rounds"][0]["rss_after_mib"] <= 8
    # The burst's memory handed back (servicekit's Trimmer), 10 s after the connections closed:
    # frames up to 1000 KiB, buffered while they arrive in pieces, make the peak 4-6x the RSS
    # before (without the trimmer 4x stays: 179 of a 246 MiB peak, 43 MiB before).
    assert report["rss_peak_mib"] > 2 * report["rss_before_mib"], report  # a burst it was
    assert report["rss_10s_after_mib"] <= 2 * report["rss_before_mib"], report
    assert report["server_log_problems"] == []
    assert report["server_exit"] == 0
