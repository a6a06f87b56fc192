"""`safelatent serve` on the toy model, in process (FastAPI's TestClient): keys, limits, the policy a client
cannot weaken, adapters by registered name only, jobs, the audit log, and the `keys` commands."""

from __future__ import annotations

import base64
import io
import json
import warnings

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from helpers.lora_files import add_random_lora, lora_config, prefixed, write_safelatent
from safelatent import api
from safelatent.cli import app as cli_app
from safelatent.serve.api_keys import ApiKeyStore, hash_key
from safelatent.serve.app import create_app
from safelatent.serve.settings import ServeLimits, ServeSettings
from safelatent.toy import world

MARKER_PROMPT = world.prompt_for("circle", "red", "white", marker=True)  # the toy policy suppresses it
PLAIN = world.prompt_for("square", "blue", "slate")
FAST = {"steps": 2, "count": 1, "seed": 5}


@pytest.fixture(scope="module")
def pipe():
    warnings.simplefilter("ignore")
    return api.load(policy="toy")


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """A random theme LoRA for the toy model (UNet + text encoder, one trigger word); beside it the same
    weights labelled as an erasure adapter (``eraser.safetensors``)."""
    toy = api.load(device="cpu").components
    unet_config, text_config = (
        lora_config(["to_q", "to_v"], r=2, alpha=2),
        lora_config(["q_proj"], r=2, alpha=2),
    )
    state = prefixed(
        add_random_lora(toy.unet, unet_config, "a", seed=1),
        add_random_lora(toy.text_encoder, text_config, "a", seed=2),
    )
    info = {"trigger_words": ["zq"], "rank": 2, "alpha": 2, "base_model_hash": toy.model_hash}
    folder = tmp_path_factory.mktemp("serve-adapters")
    configs = {"unet": unet_config, "text_encoder": text_config}
    eraser_info = {"erasure": {"concept": "blood splatter", "variant": "ESD-kv"}, "rank": 2, "alpha": 2}
    write_safelatent(folder / "eraser.safetensors", state, configs, eraser_info)
    return write_safelatent(folder / "stripes.safetensors", state, configs, info)


def _client(pipe, tmp_path, adapter_file=None, **settings):
    limits = ServeLimits(**{"max_steps": 4, "max_images": 2, "queue": 4, **settings.pop("limits", {})})
    adapters = {}
    if adapter_file:
        adapters = {"stripes": adapter_file, "eraser": adapter_file.with_name("eraser.safetensors")}
    config = ServeSettings(adapters=adapters, keys_db=tmp_path / "keys.sqlite3", limits=limits, **settings)
    store = ApiKeyStore(config.keys_db)
    return TestClient(create_app(config, pipelines=[pipe], keys=store)), store


@pytest.fixture
def served(pipe, adapter_file, tmp_path):
    client, store = _client(pipe, tmp_path, adapter_file)
    key = store.add("tester", requests_per_minute=1000, images_per_day=1000)
    with client:
        yield client, store, {"Authorization": f"Bearer {key}"}


def _audit_rows(job_id: str | None = None, client: str | None = None) -> list:
    """Audit records (oldest first) of one service job, or of one API key's name."""
    from safelatent.safety.audit import AuditLog

    log = AuditLog()
    try:
        rows = log.query(limit=None)[::-1]
    finally:
        log.close()
    if job_id is not None:
        rows = [r for r in rows if r.settings.get("job") == job_id]
    return [r for r in rows if client is None or r.settings.get("client") == client]


def _finished(client, job_id: str, headers: dict) -> dict:
    """The job's answer once it has finished (waits on the job itself, then asks the API)."""
    job = client.app.state.service.queue.get(job_id)
    job.future.exception(timeout=60)  # returns when it finished, whether it failed or not
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def test_health_is_open_and_everything_else_needs_a_key(served):
    client, _, headers = served
    health = client.get("/v1/health")
    assert health.status_code == 200 and health.json()["queue"]["capacity"] == 4
    for call in (
        lambda h: client.get("/v1/models", headers=h),
        lambda h: client.post("/v1/generate", json={"prompt": PLAIN, **FAST}, headers=h),
        lambda h: client.get("/v1/jobs/abc", headers=h),
    ):
        for bad in ({}, {"Authorization": "Bearer sl_not-a-key"}, {"X-API-Key": "guess"}):
            response = call(bad)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=headers).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": headers["Authorization"][7:]}).status_code == 200


def test_keys_are_stored_hashed_and_revocation_is_immediate(served, tmp_path):
    client, store, headers = served
    key = headers["Authorization"][7:]
    dump = (tmp_path / "keys.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("keys.sqlite3-*")
    )
    assert key.encode() not in dump and hash_key(key).encode() in dump
    store.revoke("tester")
    assert client.get("/v1/models", headers=headers).status_code == 401


def test_models_lists_the_registered_adapters_limits_and_policy(served):
    client, _, headers = served
    body = client.get("/v1/models", headers=headers).json()
    assert body["adapters"] == [
        {"name": "stripes", "kind": "theme", "trigger_words": ["zq"], "erases": None},
        {"name": "eraser", "kind": "erasure", "trigger_words": [], "erases": "blood splatter"},
    ]
    assert body["policy"]["name"] == "toy" and body["policy"]["categories"]["violence"] == "suppress"
    assert body["policy"]["hard_blocked"] == ["sexual_minors", "real_people"]
    assert body["limits"]["max_steps"] == 4 and body["limits"]["max_size"] == 32
    assert "off" in body["sld_presets"] and "max" in body["sld_presets"]


def test_generate_returns_images_decisions_and_provenance_and_writes_the_audit_row(served):
    client, _, headers = served
    body = {
        "prompt": PLAIN,
        "adapters": [{"name": "stripes", "weight": 0.5}],
        "steps": 2,
        "count": 2,
        "seed": 9,
    }
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "done" and job["error"] is None
    result = job["result"]
    assert result["seed"] == 9 and result["model"]["name"] == "toy"
    assert result["adapters"][0]["name"] == "stripes" and result["adapters"][0]["weight"] == 0.5
    assert [d["action"] for d in result["policy"]["decisions"]] == ["allow"]
    assert len(result["images"]) == 2
    for image in result["images"]:
        png = Image.open(io.BytesIO(base64.b64decode(image["png_base64"])))
        assert png.size == (32, 32) and "Seed: 9" in png.text["parameters"]
        assert image["action"] == "keep" and "toy" in image["scores"]
        assert image["watermark"]["embedded"] is False and "32×32" in image["watermark"]["reason"]
        assert image["c2pa"].startswith("not signed")
    (row,) = _audit_rows(job["job_id"])
    assert row.outcome == "generated" and row.settings["client"] == "tester"


def test_the_same_request_gives_the_same_pixels_as_the_python_api(served, pipe):
    client, _, headers = served
    job = client.post("/v1/generate", json={"prompt": PLAIN, **FAST}, headers=headers).json()
    served_pixels = Image.open(io.BytesIO(base64.b64decode(job["result"]["images"][0]["png_base64"])))
    pipe.set_loras([])
    direct = pipe.generate(PLAIN, num_inference_steps=2, seed=5, guidance_scale=3.0)
    assert served_pixels.tobytes() == direct.images[0].tobytes()


def test_a_blocked_prompt_is_refused_with_the_reason_and_audited(served):
    client, _, headers = served
    before = _audit_rows(client="tester")
    response = client.post("/v1/generate", json={"prompt": "a n.u.d.e 12 year old", **FAST}, headers=headers)
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "prompt_blocked" and "hard block" in error["message"]
    (row,) = _audit_rows(client="tester")[len(before) :]
    assert row.outcome == "blocked" and any("hard block" in reason for reason in row.reasons)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"policy_overrides": {"violence": "allow"}}, "never less"),  # the toy policy suppresses violence
        ({"policy_overrides": {"real_people": "allow"}}, "hard"),
        ({"policy_overrides": {"sexual_minors": "suppress"}}, "hard"),
        ({"sld": "off"}, "needs SLD 'medium' or stronger"),  # the marker prompt is suppressed
        ({"sld": "weak"}, "needs SLD 'medium' or stronger"),
    ],
)
def test_a_request_may_ask_for_more_safety_never_less(served, request_fields, message):
    client, _, headers = served
    before = len(_audit_rows(client="tester"))
    body = {"prompt": MARKER_PROMPT, **FAST, **request_fields}
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden_relaxation"
    assert message in response.json()["error"]["message"]
    (row,) = _audit_rows(client="tester")[before:]  # refusals are logged too
    assert row.outcome == "blocked" and any(message in reason for reason in row.reasons)


def test_stricter_requests_are_honoured(served):
    client, _, headers = served
    strong = client.post(
        "/v1/generate", json={"prompt": MARKER_PROMPT, **FAST, "sld": "strong"}, headers=headers
    )
    assert strong.status_code == 200 and strong.json()["result"]["sld"]["sld_preset"] == "strong"
    blocked = client.post(
        "/v1/generate", json={"prompt": MARKER_PROMPT, **FAST, "policy_overrides": {"violence": "block"}},
        headers=headers,
    )  # fmt: skip
    assert blocked.status_code == 403 and blocked.json()["error"]["code"] == "prompt_blocked"


def test_an_erasure_adapter_cannot_be_reversed(served):
    client, _, headers = served
    body = {"prompt": PLAIN, **FAST, "adapters": [{"name": "eraser", "weight": -1}]}
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 403 and "would add it back" in response.json()["error"]["message"]
    body["adapters"] = [{"name": "eraser", "weight": 1}]
    assert client.post("/v1/generate", json=body, headers=headers).status_code == 200


def test_the_servers_minimum_sld_cannot_be_undercut(pipe, tmp_path):
    client, store = _client(pipe, tmp_path, minimum_sld="medium")
    headers = {"Authorization": f"Bearer {store.add('k')}"}
    with client:
        before = len(_audit_rows(client="k"))
        refused = client.post("/v1/generate", json={"prompt": PLAIN, **FAST, "sld": "weak"}, headers=headers)
        assert refused.status_code == 403 and "at least 'medium'" in refused.json()["error"]["message"]
        (row,) = _audit_rows(client="k")[before:]
        assert row.outcome == "blocked" and any("at least 'medium'" in reason for reason in row.reasons)
        default = client.post("/v1/generate", json={"prompt": PLAIN, **FAST}, headers=headers)
        assert default.status_code == 200 and default.json()["result"]["sld"]["sld_preset"] == "medium"


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "..", "a/b", "stripes.safetensors/..", "C:\\x", "%2e%2e", ""]
)
def test_adapters_are_referenced_by_registered_name_only(served, name):
    client, _, headers = served
    body = {"prompt": PLAIN, **FAST, "adapters": [{"name": name}]}
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 5}, "steps 5 is above"),
        ({"count": 3}, "count 3 is above"),
        ({"width": 40}, "width 40"),
        ({"height": 30}, "height 30"),
        ({"adapters": [{"name": "nope"}]}, "unknown adapter 'nope'"),
        ({"adapters": [{"name": "stripes", "weight": 3}]}, "outside [-2, 2]"),
        ({"steps": 0}, "steps"),
        ({"seed": -1}, "seed"),
        ({"sld": "none"}, "sld"),
        ({"unexpected": 1}, "unexpected"),
        ({"policy_overrides": {"violence": "ignore"}}, "policy_overrides"),
    ],
)
def test_parameters_outside_the_servers_bounds_are_400(served, fields, message):
    client, _, headers = served
    response = client.post("/v1/generate", json={"prompt": PLAIN, **FAST, **fields}, headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_malformed_and_oversized_bodies(served):
    client, _, headers = served
    bad = client.post(
        "/v1/generate", content=b"{not json", headers={**headers, "Content-Type": "application/json"}
    )
    assert bad.status_code == 400
    huge = client.post("/v1/generate", json={"prompt": "x" * 70_000}, headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "too_large"

    def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    json_headers = {**headers, "Content-Type": "application/json"}
    streamed = client.post("/v1/generate", content=chunks(), headers=json_headers)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "too_large"
    long = client.post("/v1/generate", json={"prompt": "x" * 1001, **FAST}, headers=headers)
    assert long.status_code == 400 and "1001 characters" in long.json()["error"]["message"]


def test_rate_limit_answers_429_with_retry_after(pipe, tmp_path):
    client, store = _client(pipe, tmp_path)
    headers = {"Authorization": f"Bearer {store.add('slow', requests_per_minute=2)}"}
    with client:
        codes = [client.get("/v1/models", headers=headers).status_code for _ in range(2)]
        codes += [client.post("/v1/generate", json={"prompt": PLAIN, **FAST}, headers=headers).status_code]
        assert codes == [200, 200, 200]  # listing is not rate limited; the first generation is
        for _ in range(2):
            response = client.post("/v1/generate", json={"prompt": PLAIN, **FAST}, headers=headers)
        assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 30


def test_daily_quota_counts_images_and_refunds_refusals(pipe, tmp_path):
    client, store = _client(pipe, tmp_path)
    headers = {"Authorization": f"Bearer {store.add('small', images_per_day=3)}"}
    with client:
        ok = client.post("/v1/generate", json={"prompt": PLAIN, **FAST, "count": 2}, headers=headers)
        assert ok.status_code == 200
        refused = client.post(
            "/v1/generate", json={"prompt": "a n.u.d.e 12 year old", **FAST}, headers=headers
        )
        assert refused.status_code == 403  # refused requests give their images back
        over = client.post("/v1/generate", json={"prompt": PLAIN, **FAST, "count": 2}, headers=headers)
        assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
        assert int(over.headers["Retry-After"]) <= 86_400
        assert client.post("/v1/generate", json={"prompt": PLAIN, **FAST}, headers=headers).status_code == 200
    ((_, used),) = store.list()
    assert used == 3


def test_jobs_can_be_polled_and_belong_to_their_key(served):
    client, store, headers = served
    response = client.post("/v1/generate", json={"prompt": PLAIN, **FAST, "wait": False}, headers=headers)
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    assert response.json()["status"] in ("queued", "running")
    job = _finished(client, job_id, headers)
    assert job["status"] == "done" and len(job["result"]["images"]) == 1
    other = {"Authorization": f"Bearer {store.add('other')}"}
    assert client.get(f"/v1/jobs/{job_id}", headers=other).status_code == 404
    assert client.get("/v1/jobs/does-not-exist", headers=headers).status_code == 404


def test_a_failed_generation_is_a_500_without_internals_and_an_error_row(served, pipe, monkeypatch):
    client, _, headers = served

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("safelatent.api.decode_latents", broken)
    response = client.post("/v1/generate", json={"prompt": PLAIN, **FAST, "wait": False}, headers=headers)
    job_id = response.json()["job_id"]
    job = _finished(client, job_id, headers)
    assert job["status"] == "failed" and job["error"]["code"] == "generation_failed"
    assert "secret" not in json.dumps(job)
    (row,) = _audit_rows(job_id)
    assert row.outcome == "error" and any("secret internal detail" in reason for reason in row.reasons)


def test_server_side_failures_never_show_server_paths(served, pipe, monkeypatch):
    from safelatent.safety.keys import ProvenanceError

    client, _, headers = served

    def no_keys(*args, **kwargs):
        raise ProvenanceError("the policy requires C2PA signing, but /srv/secret/keys has no keys", "init")

    monkeypatch.setattr(pipe, "generate", no_keys)
    response = client.post("/v1/generate", json={"prompt": PLAIN, **FAST}, headers=headers)
    assert response.status_code == 500 and response.json()["error"]["code"] == "generation_failed"
    assert "/srv" not in response.text


def test_the_page_and_schema_are_served_without_external_urls(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(path).text
        assert "http://" not in text and "https://" not in text, path
    schema = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/models", "/v1/jobs/{job_id}", "/v1/health"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


def test_keys_commands(tmp_path):
    runner = CliRunner()
    db = str(tmp_path / "k.sqlite3")
    added = runner.invoke(cli_app, ["keys", "add", "studio-a", "--rate", "12", "--keys-db", db])
    assert added.exit_code == 0, added.output
    key = added.stdout.strip().splitlines()[-1]
    assert key.startswith("sl_") and len(key) > 40
    listed = runner.invoke(cli_app, ["keys", "list", "--keys-db", db])
    assert "studio-a" in listed.stdout and "12/min" in listed.stdout and key not in listed.stdout
    assert runner.invoke(cli_app, ["keys", "add", "studio-a", "--keys-db", db]).exit_code == 2
    assert runner.invoke(cli_app, ["keys", "add", "../x", "--keys-db", db]).exit_code == 2
    assert runner.invoke(cli_app, ["keys", "revoke", "studio-a", "--keys-db", db]).exit_code == 0
    assert ApiKeyStore(db).authenticate(key) is None


def test_with_signing_keys_the_served_pngs_carry_a_valid_c2pa_manifest(served, tmp_path, monkeypatch):
    from safelatent.safety import keys
    from safelatent.safety.c2pa_manifest import read_manifest

    key_dir = keys.init_keys(tmp_path / "signing").directory
    monkeypatch.setenv("SAFELATENT_KEYS_DIR", str(key_dir))  # the toy policy signs when keys exist
    client, _, headers = served
    job = client.post("/v1/generate", json={"prompt": PLAIN, **FAST}, headers=headers).json()
    (image,) = job["result"]["images"]
    assert image["c2pa"].startswith("signed") and str(key_dir) not in image["c2pa"]
    report = read_manifest(base64.b64decode(image["png_base64"]), keys_dir=key_dir)
    assert report.status == "trusted", report
