"""The REST client (sinks/_rest/{client,retry,options}.py) without a server: error classification,
backoff, answers that are not MLflow's, deadlines, TLS, auth and redaction."""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import anyio
import httpx
import pytest

from _rest_fake import URL, error
from steplog import ServerError, StepLogError
from steplog.sinks._rest.client import AuthError, NotMlflowError, RestClient
from steplog.sinks._rest.options import client_options, redact
from steplog.sinks._rest.retry import RetryPolicy, TransientError, parse_retry_after, retrying

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


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("http://user:pa#ss@host:5000/p", "pa#ss"),
        ("http://user:pa?ss@host:5000/p", "pa?ss"),
        ("http://user:pa/ss@host:5000/p", "pa/ss"),
        ("http://user:pa@ss@host:5000/p", "pa@ss"),
    ],
)
def test_redact_removes_passwords_holding_url_delimiters(url: str, password: str) -> None:
    """A password with '#', '?', '/' or '@' typed as is never survives redaction, and the host stays."""
    shown = redact(url)
    assert password not in shown
    assert "http://host:5000/p" == shown


@pytest.mark.anyio
async def test_url_credentials_are_sent_percent_decoded() -> None:
    """http://u:p%40ss@host sends basic auth for the password 'p@ss', as MLflow's client does."""
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200, json={})

    client = RestClient("http://us%3Aer:p%40ss@mlflow.test:5000", transport=httpx.MockTransport(handler), env={})
    response = await client.request("GET", "/x")
    await client.aclose()
    assert [httpx.BasicAuth("us:er", "p@ss")._auth_header] == seen
    assert (200, "http://mlflow.test:5000/x") == (response.status_code, str(response.url))


class _Trickle(httpx.AsyncByteStream):
    """A body that arrives one byte at a time, never ending (a hostile or broken server)."""

    async def __aiter__(self) -> Any:
        while True:
            await anyio.sleep(0.05)
            yield b"{"


@pytest.mark.anyio
async def test_a_trickling_answer_hits_the_total_deadline() -> None:
    """A server that trickles its answer forever is a transient failure after the request's total deadline."""
    client = RestClient(
        URL, timeout=0.3, transport=httpx.MockTransport(lambda r: httpx.Response(200, stream=_Trickle()))
    )
    with anyio.fail_after(5), pytest.raises(TransientError) as info:
        await client.request("POST", "/api/2.0/mlflow/runs/log-batch", content=b"{}")
    await client.aclose()
    assert "no complete answer within 0.3 s" in str(info.value)


@pytest.mark.anyio
async def test_a_server_that_never_answers_hits_the_total_deadline() -> None:
    """A request whose answer never comes fails within the deadline, not after httpx's per-operation timeouts."""

    async def hang(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    client = RestClient(URL, timeout=0.2, transport=httpx.MockTransport(hang))
    with anyio.fail_after(5), pytest.raises(TransientError):
        await client.request("GET", "/api/2.0/mlflow/runs/get")
    await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html><body>Please log in</body></html>", headers={"Content-Type": "text/html"}),
        httpx.Response(200, text="OK"),
        httpx.Response(200, json=[1, 2]),
    ],
)
async def test_a_200_that_is_not_mlflow_json_is_an_error(answer: httpx.Response) -> None:
    """A 200 whose body is not a JSON object (a login page, plain text) is not taken as an acknowledgement."""
    client = RestClient(URL, transport=httpx.MockTransport(lambda r: answer))
    with pytest.raises(NotMlflowError) as info:
        await client.log_batch(b'{"run_id":"x","metrics":[]}')
    await client.aclose()
    assert "HTTP 200" in str(info.value)


@pytest.mark.anyio
async def test_an_html_error_page_is_summarised_not_dumped() -> None:
    """A non-MLflow server's HTML page is named by status, content type and its first line, truncated."""
    page = "<!DOCTYPE html>\n<html><head><title>nginx</title></head>\n" + "<p>filler</p>\n" * 500
    client = RestClient(
        URL,
        transport=httpx.MockTransport(lambda r: httpx.Response(404, text=page, headers={"Content-Type": "text/html"})),
    )
    with pytest.raises(NotMlflowError) as info:
        await client.request("GET", "/api/2.0/mlflow/experiments/get-by-name")
    await client.aclose()
    message = str(info.value)
    assert "HTTP 404 text/html: '<!DOCTYPE html>'" in message
    assert "filler" not in message
    assert len(message) < 400


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403])
async def test_an_auth_failure_says_which_variables_to_set(status: int) -> None:
    """401/403 say 'authentication failed (status)' and name MLFLOW_TRACKING_TOKEN."""
    client = RestClient(URL, transport=httpx.MockTransport(lambda r: error(status, "UNAUTHENTICATED", "expired")))
    with pytest.raises(AuthError) as info:
        await client.log_batch(b"{}")
    await client.aclose()
    assert f"authentication failed ({status})" in str(info.value)
    assert "MLFLOW_TRACKING_TOKEN" in str(info.value)


@pytest.mark.anyio
async def test_an_unknown_certificate_is_permanent_and_says_how_to_fix_it() -> None:
    """A certificate the client cannot verify is not retried: the error names the two variables that fix it."""

    def refuse(request: httpx.Request) -> httpx.Response:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed certificate")
        except ssl.SSLError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc

    client = RestClient("https://mlflow.test", transport=httpx.MockTransport(refuse))
    with pytest.raises(StepLogError) as info:
        await client.request("GET", "/x")
    await client.aclose()
    assert not isinstance(info.value, TransientError)
    assert "certificate verify failed" in str(info.value)
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in str(info.value)
    assert "MLFLOW_TRACKING_INSECURE_TLS" in str(info.value)


@pytest.mark.anyio
async def test_https_against_a_plain_http_server_is_permanent() -> None:
    """https:// pointed at a plain HTTP server fails at once saying the server does not speak TLS."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer_plain_http() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        thread = threading.Thread(target=answer_plain_http, daemon=True)
        thread.start()
        client = RestClient(f"https://127.0.0.1:{port}", env={})
        with pytest.raises(StepLogError) as info:
            await client.request("GET", "/health")
        await client.aclose()
        thread.join(5)
    assert "does not speak TLS" in str(info.value)


@pytest.mark.anyio
async def test_a_retry_loop_is_written_once_and_gives_up_at_the_deadline() -> None:
    """retrying() waits between transient failures and gives up with a StepLogError naming the tries."""
    tries = 0

    async def fail() -> None:
        nonlocal tries
        tries += 1
        raise TransientError("down")

    deadline = anyio.current_time() + 0.1
    with pytest.raises(StepLogError) as info:
        await retrying(fail, policy=RetryPolicy(base=0.01, cap=0.01), deadline=deadline, what="probing", server=URL)
    assert tries >= 2
    assert f"({tries} tries)" in str(info.value)
