"""Finds secret values in log text: what the pytest plugin and the local stack's log scan look for.

A secret is looked for in every form a log line could carry it in: as written; for a hex value (a
private key, a generated signing key) also without its 0x, in upper case and as the base64 of its
bytes; for a PEM key, each line of its body; and for any value, the hex and base64 of its UTF-8 bytes. A finding names the secret and the
form, never the value, so a report about a leak does not leak it again.
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass

MIN_SECRET_CHARS = 8  # shorter values (a test's "k") would match ordinary text by chance
_HEX_RE = re.compile(r"(?:0x)?((?:[0-9a-fA-F]{2}){8,})")


def _base64_forms(raw: bytes) -> dict[str, str]:
    """Standard and URL-safe base64 of raw, without padding (a log may strip it)."""
    return {"base64": base64.b64encode(raw).decode().rstrip("="),
            "base64url": base64.urlsafe_b64encode(raw).decode().rstrip("=")}


def secret_forms(value: str | bytes) -> dict[str, str]:
    """form name -> the text a log would hold for this secret in that form."""
    if isinstance(value, bytes):
        return {"hex": value.hex(), "hex-upper": value.hex().upper(), **_base64_forms(value)}
    raw = value.encode()
    forms = {"raw": value, "utf8-hex": raw.hex(), **{f"utf8-{k}": v for k, v in _base64_forms(raw).items()}}
    if value.startswith("-----BEGIN"):  # a PEM key: any of its body lines gives it away, wrapped or not
        forms.update({f"pem-line-{n}": line for n, line in enumerate(value.splitlines()[1:-1]) if len(line) >= 32})
    hex_value = _HEX_RE.fullmatch(value.strip())
    if hex_value:
        key_bytes = bytes.fromhex(hex_value[1])
        forms.update({"hex": hex_value[1].lower(), "hex-upper": hex_value[1].upper(),
                      **{f"bytes-{k}": v for k, v in _base64_forms(key_bytes).items()}})
    return forms


@dataclass(frozen=True)
class Finding:
    """One secret found in one place: which secret, in which form, where."""

    secret: str
    form: str
    source: str

    def __str__(self) -> str:
        return f"{self.source}: secret {self.secret} ({self.form} form)"


class SecretScan:
    """The secrets to look for (name -> value), and the findings of every text scanned so far."""

    def __init__(self, secrets: dict[str, str | bytes] | None = None):
        self._needles: dict[str, tuple[str, str]] = {}  # text -> (secret name, form)
        # Every text scanned so far: a secret learnt later (a test's own config, a module's key read
        # at the end of the session) is looked for in what was logged before it too.
        self._scanned: list[tuple[str, str]] = []  # (text, source)
        self.findings: list[Finding] = []
        for name, value in (secrets or {}).items():
            self.add(name, value)

    def add(self, name: str, value: str | bytes | None) -> None:
        """Look for this secret in every text, scanned already or to come (too short values are skipped)."""
        if not value or len(value) < MIN_SECRET_CHARS:
            return
        new: dict[str, tuple[str, str]] = {}
        for form, text in secret_forms(value).items():  # a text two forms share keeps the first form
            if text not in self._needles:
                new.setdefault(text, (name, form))
        self._needles.update(new)
        for text, source in self._scanned:
            self.findings.extend(self._matches(new, text, source))

    def find(self, text: str, source: str) -> list[Finding]:
        """The secrets present in text (each name once per form), also kept in findings."""
        self._scanned.append((text, source))
        found = self._matches(self._needles, text, source)
        self.findings.extend(found)
        return found

    @staticmethod
    def _matches(needles: dict[str, tuple[str, str]], text: str, source: str) -> list[Finding]:
        """The findings of these needles in one text."""
        return [Finding(name, form, source) for needle, (name, form) in needles.items() if needle in text]
