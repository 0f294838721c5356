"""Secrets kept out of what a run records: credential-looking config keys and the values of credential
environment variables are replaced before anything is handed to a logger or written; sft.cli.entry refuses
them on the command line (Hydra would write it to `.hydra/`). No torch here."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

# Keys whose values are credentials (not `bos_token`/`eos_token`/`max_new_tokens`: vocabulary and limits).
SECRET_KEY = re.compile(r"api_?key|secret|passw(or)?d|credential|(access|auth|hf|api)_token|^token$", re.I)
# Environment variables that hold credentials (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...).
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.I)
REDACTED = "<redacted>"


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def secret_values() -> frozenset[str]:
    """The values of credential-holding environment variables (long enough not to match by accident)."""
    return frozenset(value for key, value in os.environ.items() if SECRET_ENV.search(key) and len(value) >= 8)


def redact_secrets(value: Any, secrets: frozenset[str] | None = None) -> Any:
    """A copy of plain containers with secret-looking keys' values and every credential environment
    variable's value (wherever it appears, e.g. in W&B notes) replaced by "<redacted>"."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {
            key: REDACTED if is_secret_key(str(key)) and item else redact_secrets(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value
