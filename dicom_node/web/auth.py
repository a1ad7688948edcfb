"""Who may use the web server: the holder of the node's token.

API clients send ``Authorization: Bearer <token>``. A browser logs in once with the token and gets a session
cookie (HttpOnly, SameSite=Strict, Secure over HTTPS) that is an expiry time signed with the token, so no
session is stored and changing the token logs everybody out. Forms carry a CSRF value derived from that
cookie; a POST authenticated by cookie without it is refused (a bearer header cannot be forged by a page).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import time

from dicom_node.config import Config, ConfigError
from dicom_node.logs import log_event

log = logging.getLogger("dicom_node.web")
SESSION_COOKIE = "dicom_node_session"
SESSION_SECONDS = 12 * 3600


def load_token(cfg: Config) -> str:
    """The token from http.token_env when set, else the token file (the default one made at first start)."""
    h = cfg.http
    env = os.environ.get(h.token_env, "").strip()
    if env:
        return env
    path = cfg.http_token_path
    if not path.exists() and not h.token_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        log_event(log, "http_token_created", path=str(path))
    try:
        token = path.read_text().strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"http.token_file: cannot read {path}: {exc.strerror or exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"http.token_file: {path} holds no token of at least 16 characters")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log_event(log, "http_token_readable_by_others", logging.WARNING, path=str(path))
    return token


class Auth:
    def __init__(self, token: str) -> None:
        self._key = token.encode()

    def _sign(self, what: str) -> str:
        return hmac.new(self._key, what.encode(), hashlib.sha256).hexdigest()

    def token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.strip().encode(), self._key)

    def bearer_ok(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value)

    def new_session(self, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + SESSION_SECONDS)
        return f"{expires}.{self._sign(f'session:{expires}')}"

    def session_ok(self, cookie: str, now: float | None = None) -> bool:
        expires, _, sig = cookie.partition(".")
        if not expires.isdigit() or int(expires) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(sig, self._sign(f"session:{expires}"))

    def csrf_for(self, cookie: str) -> str:
        return self._sign(f"csrf:{cookie}")

    def csrf_ok(self, cookie: str, value: str) -> bool:
        return bool(cookie) and hmac.compare_digest(value.encode(), self.csrf_for(cookie).encode())
