"""The REST client (sinks/_rest/{client,retry,options}.py) without a server: error classification,
backoff, answers that are not MLflow's, deadlines, TLS, auth and redaction."""

from __future__ import annotations

import httpx
import pytest

from _rest_fake import URL, error
from steplog import ServerError
from steplog.sinks._rest.client import RestClient
from steplog.sinks._rest.options import client_options, redact
from steplog.sinks._rest.retry import RetryPolicy, TransientError, parse_retry_after

# ---------------------------------------------------------------------------- retry classification


@pytest.mark.anyio
@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_retryable(status: int) -> None:
    """408, 429, 500, 502, 503 and 504 raise TransientError (retried), not ServerError."""
    client = RestClient(URL, transport=httpx.MockTransport(lambda r: error(status, "X", "busy")))
    with pytest.raises(TransientError):
        await client.request("GET", "/api/2.0/mlflow/runs/get")
    await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 501])
async def test_other_statuses_are_permanent_and_name_the_error_code(status: int) -> None:
    """Other 4xx (and 501) raise ServerError naming the server's error_code and message."""
    client = RestClient(URL, transport=httpx.MockTransport(lambda r: error(status, "INVALID_X", "bad thing")))
    with pytest.raises(ServerError) as info:
        await client.request("POST", "/api/2.0/mlflow/runs/log-batch", json={})
    await client.aclose()
    assert (status, "INVALID_X") == (info.value.status, info.value.error_code)
    assert "INVALID_X: bad thing" in str(info.value)


@pytest.mark.anyio
async def test_connection_errors_are_transient_and_not_applied() -> None:
    """A refused connection is transient and marked as never reaching the server; a read timeout may have."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    outcomes = []
    for handler in (refuse, stall):
        client = RestClient(URL, transport=httpx.MockTransport(handler))
        with pytest.raises(TransientError) as info:
            await client.request("GET", "/x")
        await client.aclose()
        outcomes.append(info.value.maybe_applied)
    assert [False, True] == outcomes


@pytest.mark.anyio
async def test_retry_after_is_honoured_on_429() -> None:
    """A 429 carries the server's Retry-After, which replaces the backoff."""
    client = RestClient(
        URL, transport=httpx.MockTransport(lambda r: httpx.Response(429, headers={"Retry-After": "7"}, text="slow"))
    )
    with pytest.raises(TransientError) as info:
        await client.request("GET", "/x")
    await client.aclose()
    assert 7.0 == info.value.retry_after
    assert 7.0 == RetryPolicy().delay(3, info.value.retry_after)


def test_retry_after_accepts_an_http_date() -> None:
    """Retry-After as an HTTP date gives the seconds until then."""
    assert 30.0 == parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=1767225600.0)
    assert None is parse_retry_after("soon")


def test_backoff_is_exponential_capped_and_jittered() -> None:
    """The n-th wait lies in [d/2, d] with d = min(cap, base * 2**n); Retry-After is capped too."""
    policy = RetryPolicy(base=0.5, cap=4.0, max_retry_after=20.0)
    low = [policy.delay(n, rand=lambda: 0.0) for n in range(6)]
    high = [policy.delay(n, rand=lambda: 1.0) for n in range(6)]
    assert [0.25, 0.5, 1.0, 2.0, 2.0, 2.0] == low
    assert [0.5, 1.0, 2.0, 4.0, 4.0, 4.0] == high
    assert 20.0 == policy.delay(0, retry_after=3600)


# ---------------------------------------------------------------------------- auth and TLS


def test_auth_comes_from_mlflow_environment_variables() -> None:
    """MLFLOW_TRACKING_TOKEN is a bearer header; username/password become basic auth; insecure TLS turns off checks."""
    token = client_options({"MLFLOW_TRACKING_TOKEN": "s3cret"})
    basic = client_options({"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"})
    insecure = client_options({"MLFLOW_TRACKING_INSECURE_TLS": "true"})
    assert "Bearer s3cret" == token["headers"]["Authorization"]
    assert isinstance(basic["auth"], httpx.BasicAuth)
    assert False is insecure["verify"]


@pytest.mark.anyio
async def test_bearer_token_is_sent_and_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token reaches the server in the Authorization header, but no error message shows it or a URL password."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return error(403, "PERMISSION_DENIED", "no")

    client = RestClient("http://user:pw-456@mlflow.test:5000", transport=httpx.MockTransport(handler))
    with pytest.raises(ServerError) as info:
        await client.request("GET", "/x")
    await client.aclose()
    assert ["Bearer tok-123"] == seen
    assert "tok-123" not in str(info.value)
    assert "pw-456" not in str(info.value)
    assert "http://mlflow.test:5000" == redact("http://user:pw-456@mlflow.test:5000")


def test_redact_keeps_ipv6_hosts_and_ports() -> None:
    """Credentials are removed from a URL while an IPv6 literal keeps its brackets and port."""
    assert "http://[::1]:5000/x" == redact("http://user:secret@[::1]:5000/x")
    assert "https://host:8443/a" == redact("https://user:secret@host:8443/a")
