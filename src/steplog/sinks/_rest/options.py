"""httpx options from MLflow's environment variables and the URL's own credentials; URLs safe to print."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import httpx

from ..._errors import StepLogError

__all__ = ["client_options", "redact", "split_credentials"]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user:password, user, password)``, the user and password percent-decoded.

    The credentials run up to the *last* ``@`` after ``scheme://``: a password may hold
    ``#``, ``?``, ``/`` or ``@`` as typed (a strict RFC 3986 parse would end the host at the
    first of them and leave the secret in the URL). A tracking URL has no ``@`` elsewhere.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url, None, None
    userinfo, _at, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return f"{scheme}://{host}", unquote(user), unquote(password) if colon else None


def redact(url: str) -> str:
    """The URL without user:password (safe to print)."""
    return split_credentials(url)[0]


def client_options(env: Mapping[str, str] | None = None, url: str | None = None) -> dict[str, Any]:
    """httpx client options (auth, TLS) from MLflow's environment variables, then the URL's user:password."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {"headers": {"User-Agent": "steplog"}}
    token = env.get("MLFLOW_TRACKING_TOKEN")
    user = env.get("MLFLOW_TRACKING_USERNAME")
    password = env.get("MLFLOW_TRACKING_PASSWORD")
    url_user = url_password = None
    if url is not None:
        _bare, url_user, url_password = split_credentials(url)
    if token:
        options["headers"]["Authorization"] = f"Bearer {token}"
    elif user and password is not None:
        options["auth"] = httpx.BasicAuth(user, password)
    elif url_user is not None:
        # decoded, as MLflow's client sends them: "p%40ss" is the password "p@ss"
        options["auth"] = httpx.BasicAuth(url_user, url_password or "")
    if _truthy(env.get("MLFLOW_TRACKING_INSECURE_TLS")):
        if env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            raise StepLogError(
                "MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both set: unset one of them"
            )
        options["verify"] = False
    elif env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        path = env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        try:
            options["verify"] = ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise StepLogError(
                f"MLFLOW_TRACKING_SERVER_CERT_PATH={path!r} cannot be read as certificates: {exc}"
            ) from exc
    if env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        options["cert"] = env["MLFLOW_TRACKING_CLIENT_CERT_PATH"]
    return options
