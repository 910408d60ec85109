"""Service configuration: declared once per service, read and validated once at start-up.

Every service keeps a ``service_config.json`` beside its code naming each value it reads.
``load_config`` reads them from the environment, fetches Secret Manager references, parses the
types and fails fast with ONE ``ConfigError`` listing every missing or malformed name (never a
value). Unknown keys anywhere in the declaration are errors, so a typo cannot silently drop a check.

Declaration schema (only "service" is required)::

    {
      "service": "gcsplit1",
      "secrets": ["SUCCESS_URL_SIGNING_KEY", "TPS_HOSTPAY_SIGNING_KEY"],
      "env": {
        "TP_FLAT_FEE": {"type": "decimal", "default": "3", "min": "0", "max": "100"},
        "PORT": {"type": "int", "default": "8080", "min": 1, "max": 65535},
        "ALERTING_ENABLED": {"type": "bool", "default": "true"},
        "TP_AUTH_MODE": {"choices": ["oidc", "hmac", "oidc_or_hmac", "none"], "default": "oidc"},
        "TP_OIDC_ALLOWED_EMAILS": {"type": "csv", "optional": true},
        "CLOUD_TASKS_PROJECT_ID": {}
      },
      "queues": {"GCSPLIT2_QUEUE": "gcsplit-usdt-eth-estimate-queue", "HOSTPAY_QUEUE": null},
      "targets": {"GCSPLIT2_URL": {}, "SLACK_STATUS_URL": {"optional": true}},
      "tables": ["split_payout_request", "split_payout_que"]
    }

* A field spec has: "type" (default "str"), "default" (a string, read exactly like an
  environment value), "optional" (true: absent means None), "choices" (str/csv items),
  "min"/"max" (int/decimal bounds, number or string), "doc" (free text). Without a default and
  not optional, a value is required.
* Types: str -> str; int -> int ("8080", "-1"); decimal -> Decimal in plain notation ("3",
  "0.50"); bool -> "true"/"false"/"1"/"0", any case; url -> str as configured, http(s) with a
  host; csv -> tuple of the stripped, non-empty items; queue -> a Cloud Tasks queue id.
* "secrets": a list of names (required strings) or a mapping name -> spec limited to types
  str/url and no default (a checked-in default would not be secret). Values come back wrapped
  in ``Secret``, whose repr/str/format is '***'; ``.reveal()`` returns the value.
* "queues": name -> default queue id, or null when the deployment must set it.
* "targets": name -> spec (or null) of a URL another service listens on; type is always url.
* "tables": database tables the service touches (documentation for grants; ``config.tables``).
* Names are UPPER_SNAKE and unique across sections.

Reading a value (legacy fetch_secret behaviour kept): the environment value is stripped and an
empty result counts as missing. A value of the form ``projects/<p>/secrets/<name>/versions/<v>``
is replaced by that secret version's payload, read with google-cloud-secret-manager (client
created only when a reference is present; tests inject a stand-in with the same
``access_secret_version`` method), then stripped again.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from telepay_shared.errors import ConfigError

REDACTED = "***"
SECRET_VERSION_RE = re.compile(r"projects/[^/\s]+/secrets/[^/\s]+/versions/[^/\s]+")
# Start-up must fail within Cloud Run's start-up probe window, not hang on a slow API.
SECRET_FETCH_TIMEOUT_S = 10.0

_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]*")
_TABLE_RE = re.compile(r"[a-z_][a-z0-9_]*")
_INT_RE = re.compile(r"[+-]?\d+")
_DECIMAL_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")
_QUEUE_RE = re.compile(r"[A-Za-z0-9-]{1,100}")
_BOOLS = {"true": True, "1": True, "false": False, "0": False}
_SPEC_KEYS = {"type", "default", "optional", "choices", "min", "max", "doc"}
_SECTIONS = {"service", "secrets", "env", "queues", "targets", "tables"}


class Secret:
    """A secret value that prints as '***' so it cannot reach logs, errors or reprs."""

    __slots__ = ("name", "_value")

    def __init__(self, name: str, value: str):
        self.name = name
        self._value = value

    def reveal(self) -> str:
        """Returns the secret value; call it only where the value is used, never to log."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.name}={REDACTED})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled")


class Redactor:
    """Replaces every known secret value in a text with '***'."""

    def __init__(self, secrets: Iterable[Secret | str] = ()):
        values = {s.reveal() if isinstance(s, Secret) else s for s in secrets}
        # Longest first, so a secret that contains another one is hidden whole.
        ordered = sorted((v for v in values if v), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern and text else text


def redact(text: str, secrets: Iterable[Secret | str]) -> str:
    """Returns text with every value of secrets replaced by '***'."""
    return Redactor(secrets)(text)


def _parse_int(text: str) -> int:
    """Parses a plain base-10 integer (no underscores, no spaces)."""
    if not _INT_RE.fullmatch(text):
        raise ValueError
    return int(text)


def _parse_decimal(text: str) -> Decimal:
    """Parses a plain decimal number; NaN, infinities and exponents are refused."""
    if not _DECIMAL_RE.fullmatch(text):
        raise ValueError
    return Decimal(text)


def _parse_bool(text: str) -> bool:
    """Parses true/false/1/0 in any case."""
    try:
        return _BOOLS[text.lower()]
    except KeyError:
        raise ValueError from None


def _parse_url(text: str) -> str:
    """Checks an http(s) URL with a host and returns it exactly as configured."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in text):
        raise ValueError
    parts.port  # raises ValueError for a port that is not a number in range
    return text


def _parse_csv(text: str) -> tuple[str, ...]:
    """Splits on commas, keeping the stripped non-empty items."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise ValueError
    return items


def _parse_queue(text: str) -> str:
    """Checks a Cloud Tasks queue id."""
    if not _QUEUE_RE.fullmatch(text):
        raise ValueError
    return text


TYPES: dict[str, tuple[Callable[[str], Any], str]] = {
    "str": (str, "a non-empty string"),
    "int": (_parse_int, "an integer such as 8080"),
    "decimal": (_parse_decimal, "a decimal number such as 3 or 0.50"),
    "bool": (_parse_bool, "true, false, 1 or 0"),
    "url": (_parse_url, "an http(s) URL with a host"),
    "csv": (_parse_csv, "a comma-separated list with at least one item"),
    "queue": (_parse_queue, "a Cloud Tasks queue id (letters, digits, hyphens)"),
}


@dataclass(frozen=True)
class Field:
    """One declared configuration value and how to read it."""

    name: str
    type: str = "str"
    default: str | None = None
    optional: bool = False
    secret: bool = False
    choices: tuple[str, ...] = ()
    minimum: Decimal | None = None
    maximum: Decimal | None = None

    def expectation(self) -> str:
        """Describes an acceptable value, for error messages."""
        text = "one of " + ", ".join(self.choices) if self.choices else TYPES[self.type][1]
        if self.minimum is not None:
            text += f", at least {self.minimum}"
        if self.maximum is not None:
            text += f", at most {self.maximum}"
        return ("a secret: " if self.secret else "") + text

    def parse(self, text: str) -> Any:
        """Turns a stripped, non-empty text into the typed value; ValueError if malformed."""
        value = TYPES[self.type][0](text)
        items = value if isinstance(value, tuple) else (value,)
        if self.choices and any(item not in self.choices for item in items):
            raise ValueError
        if self.minimum is not None and value < self.minimum:
            raise ValueError
        if self.maximum is not None and value > self.maximum:
            raise ValueError
        return Secret(self.name, value) if self.secret else value


@dataclass(frozen=True)
class Declaration:
    """A parsed service_config.json."""

    service: str
    fields: tuple[Field, ...]
    tables: tuple[str, ...] = ()


class Config:
    """Typed, validated configuration of one service: ``config.NAME`` or ``config["NAME"]``."""

    def __init__(self, service: str, values: Mapping[str, Any], tables: Iterable[str] = ()):
        self.service = service
        self.tables = tuple(tables)
        self._values = dict(values)
        self._redactor = Redactor(self.secrets())

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"{name} is not declared in {self.service}'s service_config.json") from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(exc.args[0]) from None

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        """Returns the value, or default when it is undeclared or absent (optional)."""
        value = self._values.get(name)
        return default if value is None else value

    def secrets(self) -> tuple[Secret, ...]:
        """Returns every loaded secret, e.g. for configure_logging."""
        return tuple(v for v in self._values.values() if isinstance(v, Secret))

    def redact(self, text: str) -> str:
        """Returns text with every secret value of this configuration replaced by '***'."""
        return self._redactor(text)

    def __repr__(self) -> str:
        return f"Config(service={self.service!r}, values={self._values!r})"


def _is_number(raw: Any) -> bool:
    """Tells whether a min/max bound is a plain number (JSON number or string)."""
    return not isinstance(raw, bool) and isinstance(raw, (int, float, str)) and bool(_DECIMAL_RE.fullmatch(str(raw)))


def _spec_problems(spec: Mapping, secret: bool, forced_type: str | None) -> list[str]:
    """Lists what is wrong with one field spec."""
    type_name = spec.get("type", forced_type or "str")
    allowed = ("str", "url") if secret else (forced_type,) if forced_type else tuple(TYPES)
    choices = spec.get("choices", [])
    checks = [
        (set(spec) <= _SPEC_KEYS, f"unknown keys {', '.join(sorted(set(spec) - _SPEC_KEYS))}"),
        (type_name in allowed, f"type must be one of {', '.join(allowed)}"),
        (not (secret and "default" in spec), "a secret has no default"),
        (isinstance(spec.get("default", ""), str), "default must be a string"),
        (isinstance(spec.get("optional", False), bool), "optional must be true or false"),
        (isinstance(choices, list) and all(isinstance(c, str) for c in choices), "choices must be a list of strings"),
        ("choices" not in spec or type_name in ("str", "csv"), "choices apply to str and csv only"),
        (all(_is_number(spec.get(key, 0)) for key in ("min", "max")), "min and max must be plain numbers"),
        (not {"min", "max"} & set(spec) or type_name in ("int", "decimal"),
         "min and max apply to int and decimal only"),
    ]
    return [message for ok, message in checks if not ok]


def _field(section: str, name: str, spec: Any, problems: list[str], *, secret=False, forced_type=None):
    """Builds a Field from a spec object (null means {}), recording every problem with it."""
    where = f"{section}.{name}"
    spec = {} if spec is None else spec
    found = _spec_problems(spec, secret, forced_type) if isinstance(spec, dict) else ["spec must be an object"]
    problems += [f"{where}: {message}" for message in found]
    if found:
        return None
    bounds = [None if spec.get(key) is None else Decimal(str(spec[key])) for key in ("min", "max")]
    field = Field(name, spec.get("type", forced_type or "str"), spec.get("default"), spec.get("optional", False),
                  secret, tuple(spec.get("choices", ())), *bounds)
    if field.default is not None and not _parses(field, field.default.strip()):
        problems.append(f"{where}: default is not {field.expectation()}")
    return field


def _parses(field: Field, text: str) -> bool:
    """Tells whether a default text is acceptable for its field."""
    try:
        field.parse(text)
    except ValueError:
        return False
    return bool(text)


def _section_fields(raw: Mapping, problems: list[str]) -> tuple[list[Field], list[str]]:
    """Builds the fields of the secrets, env, queues and targets sections, and lists every name."""
    fields: list[Field | None] = []
    names: list[str] = []
    secrets = raw.get("secrets", [])
    if isinstance(secrets, list):
        secrets = {name: None for name in secrets} if all(isinstance(n, str) for n in secrets) else None
    if not isinstance(secrets, dict):
        problems.append("secrets: must be a list of names or an object of specs")
        secrets = {}
    names += secrets
    fields += [_field("secrets", n, s, problems, secret=True) for n, s in secrets.items()]
    for section, build in (
        ("env", lambda n, s: _field("env", n, s, problems)),
        ("queues", lambda n, s: _queue_field(n, s, problems)),
        ("targets", lambda n, s: _field("targets", n, s, problems, forced_type="url")),
    ):
        entries = raw.get(section, {})
        if not isinstance(entries, dict):
            problems.append(f"{section}: must be an object")
            continue
        names += entries
        fields += [build(name, spec) for name, spec in entries.items()]
    return [f for f in fields if f is not None], names


def _queue_field(name: str, default: Any, problems: list[str]) -> Field | None:
    """Builds a queue field from its default queue id (or null when required)."""
    if default is not None and not (isinstance(default, str) and _QUEUE_RE.fullmatch(default)):
        problems.append(f"queues.{name}: default must be {TYPES['queue'][1]} or null")
        return None
    return Field(name, "queue", default)


def parse_declaration(raw: Any, origin: str = "service_config.json") -> Declaration:
    """Validates a declaration object; ConfigError lists every problem found in it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the declaration must be a JSON object")
    problems = [f"{key}: unknown section" for key in sorted(set(raw) - _SECTIONS)]
    service = raw.get("service")
    if not isinstance(service, str) or not service.strip():
        problems.append("service: must be a non-empty string")
    fields, names = _section_fields(raw, problems)
    problems += [f"{n}: name must be UPPER_SNAKE" for n in names if not _NAME_RE.fullmatch(n)]
    problems += [f"{n}: declared more than once" for n in sorted({n for n in names if names.count(n) > 1})]
    tables = raw.get("tables", [])
    if not isinstance(tables, list) or not all(isinstance(t, str) and _TABLE_RE.fullmatch(t) for t in tables):
        problems.append("tables: must be a list of lower-case table names")
        tables = []
    if problems:
        raise ConfigError(_summary(f"{origin} is invalid", problems))
    return Declaration(service, tuple(fields), tuple(tables))


def read_declaration(path: str | os.PathLike) -> Declaration:
    """Reads and validates a service_config.json file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read configuration declaration {path}: {exc}") from None
    return parse_declaration(raw, str(path))


class _Problem(Exception):
    """One missing or malformed value; collected, never raised to the caller."""


class _SecretFetcher:
    """Reads Secret Manager versions once each, creating the real client only when needed."""

    def __init__(self, client=None):
        self._client = client
        self._results: dict[str, str | _Problem] = {}

    def fetch(self, reference: str) -> str:
        """Returns the stripped payload of a secret version, or raises _Problem."""
        if reference not in self._results:
            self._results[reference] = self._access(reference)
        result = self._results[reference]
        if isinstance(result, _Problem):
            raise result
        return result

    def _access(self, reference: str) -> str | _Problem:
        """Calls access_secret_version and turns API failures into a _Problem."""
        from google.api_core.exceptions import GoogleAPICallError, RetryError
        from google.auth.exceptions import GoogleAuthError

        try:
            if self._client is None:
                from google.cloud import secretmanager

                self._client = secretmanager.SecretManagerServiceClient()
            response = self._client.access_secret_version(
                request={"name": reference}, timeout=SECRET_FETCH_TIMEOUT_S
            )
            return response.payload.data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return _Problem("the Secret Manager payload is not UTF-8 text")
        except (GoogleAPICallError, RetryError, GoogleAuthError) as exc:
            return _Problem(f"the Secret Manager reference could not be read ({type(exc).__name__})")


def _resolve(field: Field, raw: str | None, secrets: _SecretFetcher) -> Any:
    """Reads one value: strip, follow a secret reference, apply the default, parse."""
    text = (raw or "").strip()
    if SECRET_VERSION_RE.fullmatch(text):
        text = secrets.fetch(text)
    if not text and field.default is not None:
        text = field.default.strip()
    if not text:
        if field.optional:
            return None
        raise _Problem(f"missing (expected {field.expectation()})")
    try:
        return field.parse(text)
    except ValueError:
        raise _Problem(f"malformed (expected {field.expectation()})") from None


def _summary(headline: str, problems: list[str]) -> str:
    """Formats several problems as one readable message."""
    return f"{headline} ({len(problems)} problem{'s' * (len(problems) != 1)}):\n" + "\n".join(
        f"  - {p}" for p in problems
    )


def load_config(
    declaration_path: str | os.PathLike,
    environ: Mapping[str, str] = os.environ,
    secret_client=None,
) -> Config:
    """Reads every declared value from environ; one ConfigError lists all that are wrong."""
    declaration = read_declaration(declaration_path)
    fetcher = _SecretFetcher(secret_client)
    values, problems = {}, []
    for field in declaration.fields:
        try:
            values[field.name] = _resolve(field, environ.get(field.name), fetcher)
        except _Problem as problem:
            problems.append(f"{field.name}: {problem}")
    if problems:
        error = ConfigError(_summary(f"{declaration.service} configuration is invalid", problems))
        error.problems = problems
        raise error
    return Config(declaration.service, values, declaration.tables)
