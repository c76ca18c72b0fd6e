"""The HTTP API (`imgpipe serve`, a real process) on the session's real stack: keys and
scopes, uploads through the stream contract's parser, events until completion, images,
and the body cap."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from typer.testing import CliRunner

from imgpipe.face.cli import app
from imgpipe.face.stack import child_env
from imgpipe.settings import Settings
from tests.support.webfixtures import WEB_MAX_BYTES, noise_png
from tests.support.webserver import ApiServer

pytestmark = pytest.mark.timeout(180)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
TIMEOUT_S = 30


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(
    server: ApiServer,
    token: str,
    data: bytes,
    *,
    key: str | None = None,
    **fields: str,
) -> requests.Response:
    headers = auth(token) | ({"Idempotency-Key": key} if key else {})
    return requests.post(
        server.url("/v1/jobs"),
        headers=headers,
        files={"image": ("upload.bin", data, "application/octet-stream")},
        data=fields,
        timeout=TIMEOUT_S,
    )


def sse_events(response: requests.Response) -> Iterator[tuple[str, Any]]:
    """(event name, decoded data) of a text/event-stream response, as they arrive."""
    name, data = None, []
    for raw in response.iter_lines(decode_unicode=True):
        if raw == "":
            if name is not None:
                yield name, json.loads("\n".join(data))
            name, data = None, []
        elif raw.startswith("event: "):
            name = raw.removeprefix("event: ")
        elif raw.startswith("data: "):
            data.append(raw.removeprefix("data: "))


def test_every_endpoint_needs_a_key_with_its_scope(
    web_server: ApiServer, web_keys: dict[str, str]
) -> None:
    job = "00000000-0000-4000-8000-000000000000"
    sha = "0" * 64
    calls = [
        ("POST", "/v1/jobs", "submit"),
        ("GET", f"/v1/jobs/{job}", "read"),
        ("GET", f"/v1/jobs/{job}/events", "read"),
        ("GET", f"/v1/images/{sha}/original", "read"),
        ("POST", "/v1/review/next", "review"),
        ("GET", "/v1/review/queue", "review"),
        ("GET", "/v1/review/history", "review"),
        ("POST", f"/v1/review/items/{job}/decision", "review"),
    ]
    for method, path, scope in calls:
        bare = requests.request(method, web_server.url(path), timeout=TIMEOUT_S)
        assert bare.status_code == 401, (method, path, bare.text)
        assert bare.headers["WWW-Authenticate"] == "Bearer"
        assert "imgpipe apikey create" in bare.json()["message"]
        unknown = requests.request(
            method, web_server.url(path), headers=auth("ipk_not-a-key"), timeout=TIMEOUT_S
        )
        assert unknown.status_code == 401, (method, path)
        wrong = "reader" if scope != "read" else "submitter"
        refused = requests.request(
            method, web_server.url(path), headers=auth(web_keys[wrong]), timeout=TIMEOUT_S
        )
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.json()["error"] == "forbidden"
        assert f"needs {scope}" in refused.json()["message"]
    health = requests.get(web_server.url("/healthz"), timeout=TIMEOUT_S)
    assert health.json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_upload_then_events_until_completed_then_job_and_images(
    web_server: ApiServer, web_keys: dict[str, str]
) -> None:
    data = (SAMPLES / "astronaut.jpg").read_bytes()
    sent = upload(web_server, web_keys["submitter"], data, pipeline="basic", force="1")
    assert sent.status_code == 202, sent.text
    body = sent.json()
    job_id = body["job_id"]
    assert body["created"] is True
    assert sent.headers["Location"] == f"/v1/jobs/{job_id}"

    with requests.get(
        web_server.url(body["links"]["events"]),
        headers=auth(web_keys["reader"]),
        stream=True,
        timeout=TIMEOUT_S,
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(stream))  # the server ends the stream at completion
    names = [name for name, _ in events]
    assert names[-1] == "completed" and names.count("completed") == 1
    assert {"state", "stage"} <= set(names)
    stage_done = {d["stage"] for n, d in events if n == "stage" and d["status"] == "succeeded"}
    assert stage_done == {"quality", "enhance"}
    final = events[-1][1]
    assert final["status"] == "succeeded" and final["verdict"] in ("pass", "review", "fail")

    job = requests.get(web_server.url(f"/v1/jobs/{job_id}"), headers=auth(web_keys["reader"]))
    assert job.status_code == 200
    report = job.json()
    assert report["source"] == "http" and report["metadata"] == {}
    assert report["verdict"] == final["verdict"]
    assert [s["stage"] for s in report["stages"]] == ["quality", "enhance"]
    assert all(s["code_version"] for s in report["stages"]), "provenance"

    sha = hashlib.sha256(data).hexdigest()
    assert report["image_sha256"] == sha
    original = requests.get(
        web_server.url(f"/v1/images/{sha}/original"), headers=auth(web_keys["reader"])
    )
    assert original.status_code == 200 and original.content == data
    assert original.headers["content-type"] == "image/jpeg"
    again = requests.get(
        web_server.url(f"/v1/images/{sha}/original"),
        headers=auth(web_keys["reader"]) | {"If-None-Match": original.headers["ETag"]},
    )
    assert again.status_code == 304
    enhanced = requests.get(
        web_server.url(f"/v1/images/{sha}/enhanced?job_id={job_id}"),
        headers=auth(web_keys["reader"]),
    )
    assert enhanced.status_code == 200 and enhanced.content[:2] == b"\xff\xd8"
    # this job ran `basic` (no anomaly stage); other tests' jobs on the same photo may have
    # heat maps, so ask for this job's
    heatmap = requests.get(
        web_server.url(f"/v1/images/{sha}/heatmap?job_id={job_id}"),
        headers=auth(web_keys["reader"]),
    )
    assert heatmap.status_code == 404 and "anomaly" in heatmap.json()["message"]


def test_idempotency_key_gives_the_same_job(
    web_server: ApiServer, web_keys: dict[str, str]
) -> None:
    key = f"web-{noise_png()[-12:].hex()}"
    data = noise_png()
    first = upload(web_server, web_keys["submitter"], data, key=key, pipeline="basic")
    second = upload(web_server, web_keys["submitter"], noise_png(), key=key, pipeline="basic")
    assert first.status_code == 202 and second.status_code == 200, second.text
    assert first.json()["job_id"] == second.json()["job_id"]
    assert second.json()["created"] is False
    report = requests.get(
        web_server.url(f"/v1/jobs/{first.json()['job_id']}"), headers=auth(web_keys["reader"])
    ).json()
    assert report["idempotency_key"] == key
    assert report["input_sha256"] == hashlib.sha256(data).hexdigest()


def test_json_body_with_image_ref_of_a_stored_image(
    web_server: ApiServer, web_keys: dict[str, str]
) -> None:
    data = noise_png()
    assert upload(web_server, web_keys["submitter"], data, pipeline="basic").status_code == 202
    sha = hashlib.sha256(data).hexdigest()
    sent = requests.post(
        web_server.url("/v1/jobs"),
        headers=auth(web_keys["submitter"]),
        json={"image_ref": f"sha256:{sha}", "pipeline": "basic", "metadata": {"a": 1},
              "force": True},
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert sent.status_code == 202, sent.text
    report = requests.get(
        web_server.url(f"/v1/jobs/{sent.json()['job_id']}"), headers=auth(web_keys["reader"])
    ).json()
    assert report["input_sha256"] == sha and report["metadata"] == {"a": 1}


@pytest.mark.parametrize(
    ("fields", "code", "says"),
    [
        ({"pipeline": "no-such-pipeline"}, "unknown_pipeline", "known:"),
        ({"priority": "urgent"}, "bad_field", "'interactive' or 'bulk'"),
        ({"color": "red"}, "unknown_field", "allowed:"),
        ({"metadata": "[1]"}, "bad_json", "JSON object"),
        ({"reply_to": "somewhere"}, "bad_field", "imgpipe:reply:"),
        ({"force": "maybe"}, "bad_field", "force"),
    ],
)
def test_bad_fields_get_the_stream_contracts_reason_codes(
    web_server: ApiServer, web_keys: dict[str, str], fields: dict[str, str], code: str, says: str
) -> None:
    sent = upload(web_server, web_keys["submitter"], noise_png(), **fields)
    assert sent.status_code == 400, sent.text
    assert sent.json()["error"] == code
    assert says in sent.json()["message"]


def test_bodies_that_are_not_an_upload_are_refused(
    web_server: ApiServer, web_keys: dict[str, str]
) -> None:
    url, headers = web_server.url("/v1/jobs"), auth(web_keys["submitter"])
    as_text = requests.post(url, headers=headers | {"Content-Type": "text/plain"}, data=b"x")
    assert as_text.status_code == 415 and as_text.json()["error"] == "unsupported_media_type"
    inline = requests.post(url, headers=headers, json={"image": "aGVsbG8="})
    assert inline.status_code == 400 and "multipart/form-data" in inline.json()["message"]
    key_in_body = upload(web_server, web_keys["submitter"], noise_png(), idempotency_key="k")
    assert key_in_body.status_code == 400 and "Idempotency-Key" in key_in_body.json()["message"]
    not_json = requests.post(url, headers=headers | {"Content-Type": "application/json"}, data=b"{")
    assert not_json.status_code == 400 and not_json.json()["error"] == "bad_json"


def test_an_undecodable_image_is_a_rejected_job(
    web_server: ApiServer, web_keys: dict[str, str]
) -> None:
    sent = upload(web_server, web_keys["submitter"], b"not an image at all", pipeline="basic")
    assert sent.status_code == 422, sent.text
    assert sent.json()["status"] == "rejected" and sent.json()["reason"]
    job = requests.get(
        web_server.url(f"/v1/jobs/{sent.json()['job_id']}"), headers=auth(web_keys["reader"])
    )
    assert job.json()["status"] == "rejected"


def _post_headers_only(server: ApiServer, token: str, declared_bytes: int) -> tuple[int, Any]:
    """Send the headers of a huge upload and no body: only a server that refuses before
    reading answers (one that reads would wait for the body until the client timeout)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(declared_bytes))
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _post_chunked(server: ApiServer, token: str, total_bytes: int) -> tuple[int, Any]:
    host, port = server.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    chunk = b"\0" * 65536
    try:
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        head = (
            b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n"
        )
        sent = 0
        try:
            conn.send(b"%x\r\n%s\r\n" % (len(head), head))
            while sent < total_bytes:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the end: what is tested
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_body_over_the_cap_is_refused_before_it_is_read(
    web_server: ApiServer, web_keys: dict[str, str]
) -> None:
    status, body = _post_headers_only(web_server, web_keys["submitter"], 10**9)
    assert status == 413 and body["error"] == "body_too_large"
    assert "IMGPIPE_MAX_BYTES" in body["message"]
    status, body = _post_chunked(web_server, web_keys["submitter"], 2 * WEB_MAX_BYTES)
    assert status == 413 and body["error"] == "body_too_large", body
    # The server still serves (nothing was buffered past the cap).
    assert upload(web_server, web_keys["submitter"], noise_png()).status_code in (200, 202)


def test_apikey_commands_create_list_and_revoke(
    web_server: ApiServer, web_settings: Settings
) -> None:
    env = child_env(web_settings)
    runner = CliRunner()
    created = runner.invoke(
        app, ["apikey", "create", "--name", "carol", "--scope", "read"], env=env
    )
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("ipk_") and len(token) > 40
    probe = web_server.url("/v1/jobs/00000000-0000-4000-8000-000000000000")
    assert requests.get(probe, headers=auth(token)).status_code == 404

    listed = runner.invoke(app, ["apikey", "list", "--json"], env=env)
    keys = json.loads(listed.stdout)
    (mine,) = [k for k in keys if k["prefix"] == token[:12]]
    assert mine["name"] == "carol" and mine["scopes"] == ["read"]
    assert token not in listed.stdout, "the token is shown once, at create"

    revoked = runner.invoke(app, ["apikey", "revoke", str(mine["id"])], env=env)
    assert revoked.exit_code == 0, revoked.output
    refused = requests.get(probe, headers=auth(token))
    assert refused.status_code == 401 and "revoked" in refused.json()["message"]
    bad_scope = runner.invoke(app, ["apikey", "create", "--name", "x", "--scope", "admin"], env=env)
    # `imgpipe` (main) prints an ImgpipeError and exits 2; the typer app raises it.
    assert "unknown scope 'admin'; scopes are submit, read, review" in str(bad_scope.exception)
