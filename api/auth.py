"""API keys: ``Authorization: Bearer <key>`` on every /v1 route, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr


class ApiKeys:
    def __init__(self, configured: SecretStr) -> None:
        keys = [k.strip() for k in configured.get_secret_value().split(",") if k.strip()]
        if not keys:
            raise ValueError(
                "SLUICE_API_KEYS is empty: set at least one API key (comma-separated); `make up` creates one"
            )
        # The id is what logs and Redis see: a short hash, never the key.
        self._keys = [(key.encode(), hashlib.sha256(key.encode()).hexdigest()[:16]) for key in keys]

    def identify(self, presented: str) -> str | None:
        """The id of the matching key, or None. Every key is compared, so timing reveals nothing."""
        given = presented.encode()
        found: str | None = None
        for key, key_id in self._keys:
            if hmac.compare_digest(key, given):
                found = key_id
        return found
