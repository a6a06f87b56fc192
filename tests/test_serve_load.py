"""Load on loopback: 200 concurrent clients against `safelatent serve` (toy model, 2 workers, queue 16) in
a subprocess. Every accepted job completes exactly once (one result, one audit row), every rejection is a
429 with Retry-After, nothing is a 5xx, and the server's memory does not grow from wave to wave.
Figures: ``python bench/serve_load.py`` (README, "Service")."""

from __future__ import annotations

from bench.serve_load import run


def test_200_concurrent_clients_get_exactly_once_or_429():
    report = run(clients=200, waves=2, retries=0, steps=2, concurrency=2, queue=16)
    for wave in report["waves"]:
        assert set(wave["statuses"]) <= {200, 429}, wave
        assert wave["accepted"] >= 16 and wave["rejected_429"] > 0, wave  # the queue bound was reached
        assert wave["429_without_retry_after"] == 0, wave
    assert report["accepted_unique"] == report["accepted_total"] == report["completed_by_server"]
    assert report["audit_rows_per_accepted_job"] == [1]
    assert report["audit_rows_total"] == report["accepted_total"]  # rejected requests never ran
    first, second = (wave["rss_mib"] for wave in report["waves"])
    assert second - first < 50, report  # bounded: a second wave of the same load adds (almost) nothing
