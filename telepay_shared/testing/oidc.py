"""Google's ID-token issuer, locally: the tokens Cloud Tasks and Cloud Scheduler attach to a request
(`http_request.oidc_token`), and the signing certificates a service verifies them with.

Faithful to Google's in everything google-auth checks (google.oauth2.id_token.verify_token):

* the certs endpoint answers GET with {kid: PEM X.509 certificate}, the format of
  https://www.googleapis.com/oauth2/v1/certs (GOOGLE_CERTS_URL), with a Cache-Control max-age;
* a token is an RS256 JWT whose header names the kid; its claims are those Cloud Tasks sends for a
  service account: iss https://accounts.google.com, aud (the audience the task names), azp and sub
  (the account's numeric id), email, email_verified true, iat, and exp one hour later.

Only the key differs: an RSA key made here (or read from a PEM file), never Google's. A service
verifies these tokens when TP_OIDC_CERTS_URL names a `CertsServer` (telepay_shared.web).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from flask import Response
from google.auth import crypt, jwt

from telepay_shared.standins.server import StandInServer

GOOGLE_ISSUER = "https://accounts.google.com"
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
CERTS_PATH = "/oauth2/v1/certs"
TOKEN_LIFETIME_S = 3600  # Cloud Tasks' and Cloud Scheduler's ID tokens live one hour
CERTS_MAX_AGE_S = 21600
LOOPBACK = "127.0.0.1"


def account_id(email: str) -> str:
    """A stable 21-digit numeric id for a service account (Google's sub and azp are such ids)."""
    return str(10**20 + int.from_bytes(hashlib.sha256(email.encode()).digest()[:8], "big"))


class OidcIssuer:
    """One RSA signing key of 'accounts.google.com': mints ID tokens and publishes their certificate."""

    def __init__(self, private_key: rsa.RSAPrivateKey | None = None):
        self.private_key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = hashlib.sha1(public_der).hexdigest()  # Google's kids are 40 hex digits too
        self._signer = crypt.RSASigner.from_string(self.private_pem(), key_id=self.kid)
        self._certificate: str | None = None

    @classmethod
    def from_pem(cls, pem: bytes | str) -> OidcIssuer:
        """The issuer whose private key is this PEM (PKCS#8, unencrypted)."""
        data = pem.encode() if isinstance(pem, str) else pem
        return cls(serialization.load_pem_private_key(data, password=None))

    @classmethod
    def load_or_create(cls, path: Path) -> OidcIssuer:
        """The issuer kept in a PEM file, made (mode 0600) on the first call."""
        if not path.exists():
            issuer = cls()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(issuer.private_pem())
            return issuer
        return cls.from_pem(path.read_bytes())

    def private_pem(self) -> str:
        """The private key as PKCS#8 PEM (a secret: for the processes that mint, never for a log)."""
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode()

    def certificate_pem(self) -> str:
        """The self-signed X.509 certificate of the public key, as Google publishes its keys."""
        if self._certificate is None:
            now = datetime.datetime.now(datetime.timezone.utc)
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securetoken.system.gserviceaccount.com")])
            certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                           .public_key(self.private_key.public_key()).serial_number(int(self.kid[:32], 16))
                           .not_valid_before(now - datetime.timedelta(days=1))
                           .not_valid_after(now + datetime.timedelta(days=30))
                           .sign(self.private_key, hashes.SHA256()))
            self._certificate = certificate.public_bytes(serialization.Encoding.PEM).decode()
        return self._certificate

    def certs(self) -> dict[str, str]:
        """What GOOGLE_CERTS_URL answers: kid -> PEM certificate."""
        return {self.kid: self.certificate_pem()}

    def mint(self, audience: str, email: str, /, *, now: float | None = None, lifetime_s: int = TOKEN_LIFETIME_S,
             **claims) -> str:
        """An ID token for `email` with audience `audience`, as Cloud Tasks mints it; claims override any field."""
        issued = int(time.time() if now is None else now)
        subject = account_id(email)
        payload = {"aud": audience, "azp": subject, "email": email, "email_verified": True,
                   "exp": issued + lifetime_s, "iat": issued, "iss": GOOGLE_ISSUER, "sub": subject, **claims}
        return jwt.encode(self._signer, payload).decode()

    def transport(self, status: int = 200) -> CertsTransport:
        """A google-auth transport answering every GET with this issuer's certs (no HTTP server needed)."""
        return CertsTransport([self], status)


def certs_body(issuers) -> bytes:
    """The JSON body of the certs endpoint for these issuers' keys."""
    return json.dumps({kid: pem for issuer in issuers for kid, pem in issuer.certs().items()}).encode()


class CertsTransport:
    """Answers google-auth's certificate GETs from local issuers, recording each URL asked for."""

    def __init__(self, issuers, status: int = 200):
        self.body, self.status = certs_body(issuers), status
        self.calls: list[str] = []

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        self.calls.append(url)
        return SimpleNamespace(status=self.status, data=self.body, headers={})


class CertsServer(StandInServer):
    """Serves issuers' certificates over HTTP on 127.0.0.1 at CERTS_PATH, as www.googleapis.com does."""

    url_path = CERTS_PATH  # `url` is the certs URL to give a service as TP_OIDC_CERTS_URL

    def __init__(self, *issuers: OidcIssuer, port: int = 0):
        super().__init__(LOOPBACK, port, hang_s=0.0)
        self.issuers = issuers
        self.requests = 0
        self._body = certs_body(issuers)
        self.app = self.app_on_every_path(__name__, self._get_view)

    def _get_view(self, path: str) -> Response:
        """The certificates at CERTS_PATH, an empty 404 elsewhere; cacheable, as Google's."""
        self.requests += 1
        found = "/" + path == CERTS_PATH
        return Response(self._body if found else b"", status=200 if found else 404, headers={
            "Content-Type": "application/json; charset=UTF-8",
            "Cache-Control": f"public, max-age={CERTS_MAX_AGE_S}, must-revalidate"})
