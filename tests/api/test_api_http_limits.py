"""The HTTP layer's limits on a real uvicorn started as `promptstore serve` starts it
(``api.cli.http_options``): a body over the limit is 413 JSON however it is sent, and a
request line or headers over ``http_max_header_bytes`` get the HTTP layer's documented 400."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from apiclient import ADMIN, _one_torch_thread, embedded_settings  # noqa: F401

from api.middleware import FORM_OVERHEAD_BYTES

MAX_UPLOAD = 1000
OVER = MAX_UPLOAD + FORM_OVERHEAD_BYTES + 10_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    import uvicorn

    from api.app import create_app
    from api.cli import http_options

    settings = embedded_settings(tmp_path_factory.mktemp("httplimits"), max_upload_bytes=MAX_UPLOAD,
                                 http_max_header_bytes=4096)
    app = create_app(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                                        **http_options(settings)))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        r = httpx.post(f"{url}/v1/admin/tenants", json={"name": "limits"}, headers=ADMIN, timeout=30)
        assert r.status_code == 201, r.text
        yield url, {"Authorization": f"Bearer {r.json()['api_key']}"}
    finally:
        srv.should_exit = True
        thread.join(30)


def _json_413(r: Any) -> None:
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "over the limit" in r.json()["detail"]


def test_a_body_over_the_limit_is_413_json_however_it_is_sent(server: tuple[str, dict[str, str]]) -> None:
    url, tenant = server
    big = b"x" * OVER
    with httpx.Client(base_url=url, timeout=30) as http:
        # with Content-Length
        _json_413(http.post("/v1/tasks", files={"dataset": ("d.zip", big, "application/zip")},
                            data={"name": "t", "method": "coop"}, headers=tenant))
        _json_413(http.post("/v1/admin/tenants", content=big, headers={**ADMIN, "Content-Type": "application/json"}))

        # chunked, no Content-Length: a JSON body, a multipart form, a classify body
        def chunks(data: bytes) -> Iterator[bytes]:
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]

        boundary = "b0undary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nt\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"method\"\r\n\r\ncoop\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"; filename=\"d.zip\"\r\n"
                "Content-Type: application/zip\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
        r = http.post("/v1/tasks", content=chunks(form),
                      headers={**tenant, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        _json_413(r)
        r = http.post("/v1/admin/tenants", content=chunks(b'{"name": "' + big + b'"}'),
                      headers={**ADMIN, "Content-Type": "application/json"})
        _json_413(r)
        r = http.post("/v1/tasks/nope/classify", content=chunks(b'{"images": ["' + big + b'"]}'),
                      headers={**tenant, "Content-Type": "application/json"})
        assert r.status_code in (404, 413), r.text  # the task is looked up first; never a 400 or 500
        assert r.headers["content-type"].startswith("application/json")
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_a_text_field_over_the_form_limit_is_413(server: tuple[str, dict[str, str]]) -> None:
    url, tenant = server
    r = httpx.post(f"{url}/v1/tasks", files={"classes": (None, "x" * (FORM_OVERHEAD_BYTES // 2))},
                   data={"name": "t", "method": "zeroshot"}, headers=tenant, timeout=30)
    assert r.status_code in (413, 422), r.text
    assert r.headers["content-type"].startswith("application/json")


def _raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        # h11 bounds what it has buffered without finding the end of the head: send the head
        # in two writes, as a slow or hostile client does
        s.sendall(request[: len(request) - 4])
        time.sleep(0.2)
        try:
            s.sendall(request[len(request) - 4 :])
        except OSError:
            pass  # the server answered and closed already
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


@pytest.mark.parametrize("where", ["request line", "header", "many headers"])
def test_the_http_layer_answers_400_past_its_header_limit(server: tuple[str, dict[str, str]], where: str) -> None:
    url, _ = server
    if where == "request line":
        req = b"GET /healthz?" + b"a" * 8000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    elif where == "header":
        req = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    else:
        req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n"
    out = _raw(url, req)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), out[:200]
    assert b"content-type: text/plain" in head.lower()
    assert body == b"Invalid HTTP request received."
    # under the limit the same request is served
    assert _raw(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
