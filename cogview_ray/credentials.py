"""Credentials in the run config: which storage options a URI is opened with, and how they (and any
user:password in a URL) are kept out of saved configs, output identities and error messages."""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # config.py imports this module for its error messages
    from .config import RunConfig

REDACTED = "***"
# Key names whose values are never shown in errors or saved configs.
_SECRET_KEY_RE = re.compile(r"key|secret|token|passw|credential", re.IGNORECASE)
# Anywhere in a text: `scheme://user:pass@` and a URL's query string (signed URLs carry their
# credentials there: X-Amz-Signature, sig, token ...).
_ANY_USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_ANY_QUERY_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s?#]*)\?[^\s#]*")


def is_secret_key(name: str) -> bool:
    """True if a setting called `name` (the last part of a dotted key) may hold a credential."""
    return bool(_SECRET_KEY_RE.search(name))


def strip_userinfo(text: Any) -> Any:
    """`s3://user:pass@bucket/x?sig=abc` -> `s3://***@bucket/x?***`: credentials in URLs (user
    info, signed query strings) never leave; other values are returned unchanged."""
    return redact_text(text) if isinstance(text, str) else text


def redact_text(text: str) -> str:
    """`text` with every URL's user info and query string replaced by '***' (error messages,
    log lines, manifest cells)."""
    text = _ANY_USERINFO_RE.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    return _ANY_QUERY_RE.sub(lambda m: f"{m.group(1)}?{REDACTED}", text)


def storage_options_for(uri: str, cfg: RunConfig) -> dict:
    """fsspec options for the dataset or a remote model: the output's when on the same protocol
    (one set of credentials for one object store), else none (the usual environment)."""
    def protocol(u: str) -> str:
        return u.split("://", 1)[0] if "://" in u else "file"

    return dict(cfg.output.storage_options) if protocol(uri) == protocol(cfg.output.uri) else {}


def redacted(cfg: RunConfig) -> dict:
    """The resolved config as a plain dict, safe to save or log: secrets become '***'."""
    plain = dataclasses.asdict(cfg)
    plain["output"]["storage_options"] = REDACTED
    return _redact(plain)


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and is_secret_key(k) else _redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return strip_userinfo(value)
