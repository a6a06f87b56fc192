"""The service's parts on their own: the only-stricter rules, the token bucket, the bounded job queue,
adapter registration and the key store."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from safelatent.errors import InvalidArgumentError
from safelatent.safety.gate import refuse_relaxed_overrides, refuse_weaker_sld, strongest_preset
from safelatent.safety.policy_file import SafetyRelaxationError, load_policy
from safelatent.serve.api_keys import ApiKeyStore
from safelatent.serve.jobs import Job, JobQueue, QueueFull
from safelatent.serve.rate_limit import RateLimiter, retry_after_header
from safelatent.serve.settings import ServeSettings, parse_adapter_option, scan_adapter_folder


def _decision(action, preset=None, categories=("violence",)):
    return SimpleNamespace(action=action, sld_preset=preset, actions=dict.fromkeys(categories, action))


def test_overrides_may_only_tighten_the_policy():
    policy = load_policy("default")  # every policy category "suppress"
    for stricter in ({"violence": "block"}, {"violence": "suppress"}, {"real_people": "block"}, None):
        refuse_relaxed_overrides(policy, stricter)
    for laxer in ({"violence": "allow"}, {"sexual_minors": "allow"}, {"real_people": "suppress"}):
        with pytest.raises(SafetyRelaxationError, match="never less"):
            refuse_relaxed_overrides(policy, laxer)
    refuse_relaxed_overrides(policy, {"nonsense": "allow"})  # unknown names are with_overrides' to report


def test_sld_may_not_be_weaker_than_a_suppressed_category_needs():
    suppressed = [_decision("allow"), _decision("suppress", "strong")]
    for fine in (None, "strong", "max", "STRONG "):
        refuse_weaker_sld(suppressed, fine)
    for weaker in ("off", "weak", "medium", "weak-diffusers"):
        with pytest.raises(SafetyRelaxationError, match="needs SLD 'strong'"):
            refuse_weaker_sld(suppressed, weaker)
    refuse_weaker_sld([_decision("allow")], "off")  # nothing suppressed: anything goes
    with pytest.raises(SafetyRelaxationError, match="'medium'"):
        refuse_weaker_sld([_decision("suppress", None)], "weak")  # no preset named: medium


def test_strongest_preset():
    assert strongest_preset("off", None) == "off"
    assert strongest_preset("weak", "medium", None) == "medium"
    assert strongest_preset("max", "weak-diffusers") == "max"
    assert strongest_preset(None, None) is None


def test_token_bucket_allows_a_burst_then_the_rate():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.acquire(1, 3) for _ in range(3)] == [0, 0, 0]  # a minute's worth at once
    wait = limiter.acquire(1, 3)
    assert wait == pytest.approx(20.0)  # one token per 20 s
    assert limiter.acquire(2, 3) == 0  # keys are independent
    now[0] += 20.0
    assert limiter.acquire(1, 3) == 0 and limiter.acquire(1, 3) > 0
    assert retry_after_header(0.2) == "1" and retry_after_header(19.01) == "20"


def _blocking_job(release: threading.Event, owner: int = 1) -> Job:
    return Job(owner=owner, run=lambda pipe: (release.wait(10), {"pipe": pipe})[1])


def test_the_queue_bounds_jobs_and_runs_each_exactly_once():
    release = threading.Event()
    queue = JobQueue(["p0", "p1"], capacity=3, keep_seconds=60)
    jobs = [queue.submit(_blocking_job(release)) for _ in range(3)]
    with pytest.raises(QueueFull) as full:
        queue.submit(_blocking_job(release))
    assert full.value.retry_after >= 1
    deadline = time.monotonic() + 5
    while queue.stats()["running"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert queue.stats() == {"queued": 1, "running": 2, "capacity": 3, "workers": 2, "completed": 0}
    release.set()
    results = [job.future.result(timeout=10) for job in jobs]
    assert {r["pipe"] for r in results} == {"p0", "p1"}  # both workers took jobs
    assert queue.stats()["completed"] == 3 and all(queue.get(j.id).status == "done" for j in jobs)
    queue.submit(_blocking_job(release)).future.result(timeout=10)  # room again
    queue.close()


def test_a_failing_job_fails_alone_and_finished_jobs_expire():
    queue = JobQueue(["p"], capacity=2, keep_seconds=0.0)

    def boom(pipe):
        raise ValueError("bad")

    failed = queue.submit(Job(owner=1, run=boom))
    with pytest.raises(ValueError):
        failed.future.result(timeout=10)
    assert failed.status == "failed" and isinstance(failed.error, ValueError)
    ok = queue.submit(Job(owner=1, run=lambda pipe: {"ok": True}))
    assert ok.future.result(timeout=10) == {"ok": True}
    time.sleep(0.01)
    assert queue.get(failed.id) is None and queue.get(ok.id) is None  # kept 0 s
    queue.close()


def test_adapter_registration(tmp_path):
    (tmp_path / "watercolor.safetensors").write_bytes(b"x")
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert scan_adapter_folder(tmp_path) == {
        "watercolor": tmp_path / "watercolor.safetensors",
        "run1": tmp_path / "run1" / "pytorch_lora_weights.safetensors",
    }
    assert parse_adapter_option(" wc = /a/b.safetensors") == ("wc", Path("/a/b.safetensors"))
    for bad in ("noequals", "../x=/a", "=/a", "x="):
        with pytest.raises(InvalidArgumentError):
            parse_adapter_option(bad)
    with pytest.raises(InvalidArgumentError, match="not a file"):
        ServeSettings(adapters={"ghost": tmp_path / "ghost.safetensors"})
    with pytest.raises(InvalidArgumentError, match="unknown SLD preset"):
        ServeSettings(minimum_sld="extreme")
    assert ServeSettings(minimum_sld="strong").default_sld == "strong"  # the default is never below it


def test_key_store_quota_is_atomic_per_day(tmp_path):
    store = ApiKeyStore(tmp_path / "k.sqlite3")
    store.add("a", images_per_day=5)
    ((record, _),) = store.list()
    day = store.reserve_images(record, 4)
    assert day is not None and store.reserve_images(record, 2) is None
    store.release_images(record, 4, "2001-01-01")  # a refund goes to the day that was charged
    assert store.reserve_images(record, 2) is None
    store.release_images(record, 4, day)
    assert store.reserve_images(record, 5) == day
    assert store.list()[0][1] == 5
    assert store.authenticate("sl_" + "x" * 43) is None and store.authenticate(None) is None
    with pytest.raises(InvalidArgumentError, match="requests per minute"):
        store.add("b", requests_per_minute=0)


def test_clients_see_the_models_name_never_the_servers_path(tmp_path):
    from safelatent.serve.app import Service

    components = SimpleNamespace(
        source="/srv/secret/models/sd15-pruned.safetensors",
        model_hash="0123456789",
        architecture="sd15",
        vae_scale_factor=8,
    )
    fake = SimpleNamespace(components=components, default_size=512, policy=load_policy("default"))
    service = Service(ServeSettings(model=components.source), [fake], ApiKeyStore(tmp_path / "k.sqlite3"))
    listing = service.models_json()
    assert listing["model"] == {
        "name": "sd15-pruned.safetensors",
        "hash": "0123456789",
        "architecture": "sd15",
    }
    assert "/srv" not in str(listing)
    assert listing["limits"]["max_size"] == 512 and listing["defaults"]["steps"] == 30
    service.queue.close()
