"""TLS for the API, no cleartext tokens on the network, and an optional /metrics token.

Before the fix there was no TLS at all: with a non-loopback host, bearer tokens
crossed the network in cleartext, and /metrics needed no token.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import ssl
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from supervisor import config
from supervisor.errors import ConfigError
from tests.daemon import ROOT, wait_for
from tests.test_api import sha256hex

TOKEN = "tls-test-token"


@pytest.fixture
def cert(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    crt, key = tmp_path / "api.crt", tmp_path / "api.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return crt, key


def _get(url: str, ctx: ssl.SSLContext | None, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_api_serves_https_and_metrics_can_need_a_token(
    daemons: Any, cert: tuple[pathlib.Path, pathlib.Path]
) -> None:
    crt, key = cert
    tokens = [{"name": "t", "tenant": "A", "sha256": sha256hex(TOKEN), "scopes": ["read", "write"]}]
    server = {"tls_cert": str(crt), "tls_key": str(key), "metrics_auth": True}
    d = daemons(start=False, extra={"server": server, "auth": {"tokens": tokens}})
    d.url = d.url.replace("http://", "https://")
    d.start(wait=False)
    trust = ssl.create_default_context(cafile=str(crt))
    wait_for(lambda: _ready(d.url, trust), 60, 0.1, "the daemon ready over https")
    assert "tls=on" in d.log()

    status, body = _get(d.url + "/v1/batches", trust, TOKEN)
    assert status == 200 and "batches" in json.loads(body)
    assert _get(d.url + "/metrics", trust)[0] == 401  # metrics_auth: a token is needed
    status, body = _get(d.url + "/metrics", trust, TOKEN)
    assert status == 200 and b"batch_supervisor_build_info" in body
    # Plain HTTP on the same port is not served.
    with pytest.raises(OSError):
        _get(d.url.replace("https://", "http://") + "/healthz", None)

    # The CLI reads the address (https) from the config; SSL_CERT_FILE trusts the cert.
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "list", "--config", str(d.config_path)],
        cwd=ROOT,
        env={**d.env, "BATCH_SUPERVISOR_TOKEN": TOKEN, "SSL_CERT_FILE": str(crt)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def _ready(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        return _get(url + "/readyz", ctx)[0] == 200
    except OSError:
        return False


def test_tokens_in_cleartext_on_the_network_are_refused() -> None:
    tok = {"name": "t", "tenant": "A", "sha256": "b" * 64, "scopes": ["read"]}
    with pytest.raises(ConfigError) as exc:
        config.from_mapping({"server": {"host": "10.1.2.3"}, "auth": {"tokens": [tok]}})
    assert exc.value.problems[0].startswith("server.tls_cert: on '10.1.2.3'"), exc.value.problems
    with pytest.raises(ConfigError) as exc:
        config.from_mapping({"server": {"tls_cert": "/nonexistent.crt"}})
    assert exc.value.problems == ["server.tls_key: required with server.tls_cert/tls_key"]
    with pytest.raises(ConfigError) as exc:
        config.from_mapping({"server": {"tls_cert": "/nonexistent.crt", "tls_key": "/no.key"}})
    assert exc.value.problems[0].startswith("server.tls_cert: cannot load the certificate")
