"""Secrets kept out of what a run records: credential-looking config keys and the values of credential
environment variables are replaced before anything is handed to a logger. No torch here."""

from __future__ import annotations

import os
import re
from typing import Any

# Config keys whose values are secrets (not `eos_token` & co: those are vocabulary, not credentials).
SECRET_KEY = re.compile(r"api_?key|secret|passw(or)?d|credential|(access|auth|hf)_token|^token$", re.I)
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.I)
REDACTED = "<redacted>"


def redact_secrets(value: Any, secrets: frozenset[str] | None = None) -> Any:
    """A copy of a plain config with secret-looking keys, and any value of a secret environment variable
    (WANDB_API_KEY, HF_TOKEN, ...) wherever it appears, replaced by "<redacted>"."""
    if secrets is None:
        secrets = frozenset(v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8)
    if isinstance(value, dict):
        return {
            key: REDACTED if SECRET_KEY.search(str(key)) and item else redact_secrets(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value
