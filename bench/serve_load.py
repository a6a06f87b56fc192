"""Load test of ``safelatent serve`` on loopback: many concurrent clients against the toy model.

Starts ``safelatent serve`` (toy model, ``--concurrency`` workers, a ``--queue`` bound) in a subprocess,
then sends ``--clients`` generate requests at once, in ``--waves`` waves. Each client retries a 429 up to
``--retries`` times after the ``Retry-After`` the server gave (capped at 1 s so a run stays short).
Reports, per wave: accepted / rejected counts, status codes, latency percentiles, the server's resident
memory; then checks every accepted job against the audit log (exactly one row each). The behaviour test
(``tests/test_serve_load.py``) asserts these properties; this script prints the figures::

    python bench/serve_load.py --clients 200 --waves 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx

PROMPT = "a red circle on a white background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident_mb(pid: int) -> float:
    """The process's resident set size (Linux ``/proc``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextmanager
def running_server(
    folder: Path, *, concurrency: int = 2, queue: int = 16, rate: float = 10_000, extra_args: tuple = ()
):
    """``safelatent serve`` on a free loopback port with one API key; yields ``(url, key, process)``.
    ``extra_args``: more ``serve`` options (e.g. ``("--adapter", "name=path")``)."""
    from safelatent.serve.api_keys import ApiKeyStore

    keys_db = folder / "keys.sqlite3"
    key = ApiKeyStore(keys_db).add("load", requests_per_minute=rate, images_per_day=10_000_000)
    port = free_port()
    env = {**os.environ, "SAFELATENT_AUDIT_DB": str(folder / "audit.sqlite3"), "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-c", "from safelatent.cli import main; main()", "serve",
        "--port", str(port), "--keys-db", str(keys_db), "--concurrency", str(concurrency),
        "--queue", str(queue), "--max-steps", "4", "--max-images", "2", *extra_args,
    ]  # fmt: skip
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {(folder / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /v1/health within 120 s")
            time.sleep(0.2)
        yield url, key, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


async def _client(http: httpx.AsyncClient, index: int, retries: int, steps: int) -> list[dict]:
    """One client's attempts: each ``{"status", "seconds", "job_id", "retry_after"}``."""
    attempts = []
    body = {"prompt": PROMPT, "steps": steps, "seed": index, "wait": True}
    for _ in range(retries + 1):
        started = time.perf_counter()
        response = await http.post("/v1/generate", json=body)
        record = {"status": response.status_code, "seconds": time.perf_counter() - started}
        if response.status_code == 200:
            record["job_id"] = response.json()["job_id"]
        if response.status_code == 429:
            record["retry_after"] = response.headers.get("Retry-After")
        attempts.append(record)
        if response.status_code != 429:
            break
        await asyncio.sleep(min(float(record["retry_after"] or 1), 1.0))
    return attempts


async def wave(url: str, key: str, clients: int, retries: int, steps: int) -> list[dict]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=300) as http:
        results = await asyncio.gather(*(_client(http, i, retries, steps) for i in range(clients)))
    return [attempt for attempts in results for attempt in attempts]


def audit_rows_per_job(audit_db: Path) -> Counter:
    """How many audit rows each job of the load test's key has."""
    from safelatent.safety.audit import AuditLog

    log = AuditLog(audit_db, create=False)
    try:
        records = log.query(limit=None)
    finally:
        log.close()
    return Counter(r.settings.get("job") for r in records if r.settings.get("client") == "load")


def run(clients: int, waves: int, retries: int, steps: int, concurrency: int, queue: int) -> dict:
    """Run the load test; returns the per-wave figures and the exactly-once check."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(Path(tmp), concurrency=concurrency, queue=queue) as (url, key, process),
    ):
        asyncio.run(wave(url, key, 2, 0, steps))  # warm-up: the first generation builds kernels
        memory = [resident_mb(process.pid)]
        rows, accepted_ids = [], []
        for number in range(waves):
            started = time.perf_counter()
            attempts = asyncio.run(wave(url, key, clients, retries, steps))
            seconds = time.perf_counter() - started
            memory.append(resident_mb(process.pid))
            ok = sorted(a["seconds"] for a in attempts if a["status"] == 200)
            accepted_ids += [a["job_id"] for a in attempts if a["status"] == 200]
            rows.append(
                {
                    "wave": number + 1,
                    "requests": len(attempts),
                    "statuses": dict(Counter(a["status"] for a in attempts)),
                    "accepted": len(ok),
                    "rejected_429": sum(a["status"] == 429 for a in attempts),
                    "429_without_retry_after": sum(
                        a["status"] == 429 and not a.get("retry_after") for a in attempts
                    ),
                    "p50_s": round(ok[len(ok) // 2], 3) if ok else None,
                    "p95_s": round(ok[int(len(ok) * 0.95)], 3) if ok else None,
                    "wall_s": round(seconds, 1),
                    "rss_mib": round(memory[-1], 1),
                }
            )
        health = httpx.get(f"{url}/v1/health", timeout=5).json()
        per_job = audit_rows_per_job(Path(tmp) / "audit.sqlite3")
    warmup_jobs = 2
    return {
        "clients": clients,
        "waves": rows,
        "rss_mib_after_warmup": round(memory[0], 1),
        "accepted_total": len(accepted_ids),
        "accepted_unique": len(set(accepted_ids)),
        "completed_by_server": health["queue"]["completed"] - warmup_jobs,
        "audit_rows_per_accepted_job": sorted(set(per_job[j] for j in accepted_ids)),
        "audit_rows_total": sum(per_job.values()) - warmup_jobs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--queue", type=int, default=16)
    args = parser.parse_args()
    report = run(args.clients, args.waves, args.retries, args.steps, args.concurrency, args.queue)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
