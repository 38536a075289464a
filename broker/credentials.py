"""NATS identities: an operator, its accounts, and one user credential per role or per node.

Decentralized authentication (nats-server's "operator mode"): the server trusts one operator
key and preloads the accounts it signed, a system account and the application account (with
JetStream). Every user is a JWT signed by the application account's key that carries the
user's permissions (``broker.permissions``); the server checks the signature and enforces
them. So minting a credential changes nothing on the server and needs no restart: a node's is
minted offline, one per node, and a leaked node credential speaks only as that node.

The seeds live in ``<data-dir>/nats-auth/`` (directory 0700, files 0600), as do the ``.creds``
files: the user JWT and its seed in the standard format that nats-py (``user_credentials``)
and the ``nats`` CLI (``--creds``) read. Nothing here logs a seed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys

from . import permissions

ACCOUNT_NAME = "llm-router"
# A node name becomes a subject token, a durable consumer name and a file name as it is; it
# appears in a dozen of its permissions, which must fit the server's 4 KB CONNECT line.
NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_UNLIMITED = {"subs": -1, "data": -1, "payload": -1}
_JETSTREAM_UNLIMITED = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
_ACCOUNT_UNLIMITED = {"imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}


@dataclass(frozen=True)
class Identity:
    """Who a credential says it is: a role, and for a node its node id."""

    role: str
    node_id: str | None = None

    @property
    def inbox_prefix(self) -> str:
        return permissions.inbox_prefix(self.role, self.node_id)

    @property
    def user_name(self) -> str:
        """The JWT's ``name``, which :func:`identity_of` reads back (and `nats server report connections` shows)."""
        return f"{permissions.NODE}:{self.node_id}" if self.role == permissions.NODE else self.role


class CredentialsError(RuntimeError):
    """A credentials file that is missing or is not one."""


def node_name_error(name: str) -> str | None:
    if not NODE_NAME.match(name):
        return "a node name is 1 to 32 letters, digits, '-' or '_'"
    return None


def identity_of(creds: str | Path) -> Identity | None:
    """The identity in a ``.creds`` file minted here; None for any other credential (an
    external NATS's own users: those components connect as before, provisioning everything)."""
    try:
        text = Path(creds).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read NATS credentials {creds}: {exc.strerror}") from exc
    match = re.search(r"-----BEGIN NATS USER JWT-----\s*\n([\w\-.=]+)\s*\n", text)
    if not match:
        raise CredentialsError(f"{creds}: not a NATS credentials file (no user JWT)")
    try:
        payload = match.group(1).split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise CredentialsError(f"{creds}: unreadable user JWT") from exc
    if not isinstance(claims, dict):
        raise CredentialsError(f"{creds}: unreadable user JWT")
    role, _, node_id = str(claims.get("name", "")).partition(":")
    if role == permissions.NODE and node_id and node_name_error(node_id) is None:
        return Identity(role, node_id)
    if role in permissions.ROLES and not node_id:
        return Identity(role)
    return None


# ---------------------------------------------------------------- JWTs


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _public(key: nkeys.KeyPair) -> str:
    return key.public_key.decode()


def _jwt(subject: str, name: str, nats: dict, signer: nkeys.KeyPair) -> str:
    """A JWT as nats-io/jwt v2 encodes one: ``jti`` is the base32 SHA-512/256 of the standard
    claims (in Go's field order), the signature ed25519 over ``header.payload``."""
    claims = {"iat": int(time.time()), "iss": _public(signer), "name": name, "sub": subject}
    claims = {"jti": base64.b32encode(hashlib.new("sha512_256", _json(claims)).digest()).decode().rstrip("=")} | claims
    claims["nats"] = {**nats, "version": 2}
    signed = f"{_b64(_json(_HEADER))}.{_b64(_json(claims))}"
    return f"{signed}.{_b64(signer.sign(signed.encode()))}"


def creds_text(user_jwt: str, seed: bytes) -> str:
    """The standard ``.creds`` layout (nats-io/jwt ``FormatUserConfig``)."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def _new_seed(prefix: int) -> bytes:
    return nkeys.encode_seed(os.urandom(32), prefix)


def write_private(path: Path, text: str, *, replace: bool = True) -> bool:
    """Write a secret file with mode 0600 from its first byte. With ``replace=False`` an
    existing file is kept (two processes creating the same seed at once agree on one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    try:
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


class Authority:
    """The operator and accounts of one deployment, kept in ``directory``; mints user credentials."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        self._operator = self._key("operator.nk", nkeys.PREFIX_BYTE_OPERATOR)
        self._system = self._key("system-account.nk", nkeys.PREFIX_BYTE_ACCOUNT)
        self._account = self._key("account.nk", nkeys.PREFIX_BYTE_ACCOUNT)

    def _key(self, name: str, prefix: int) -> nkeys.KeyPair:
        path = self.directory / name
        if not path.exists():
            write_private(path, _new_seed(prefix).decode() + "\n", replace=False)
        return nkeys.from_seed(path.read_bytes().strip())

    @property
    def account(self) -> str:
        """The application account's public key: JetStream keeps its data under that name."""
        return _public(self._account)

    def server_config(self) -> list[str]:
        """nats-server config lines: trust the operator, preload both accounts (no resolver server)."""
        operator = _jwt(
            _public(self._operator),
            ACCOUNT_NAME,
            {"type": "operator", "system_account": _public(self._system)},
            self._operator,
        )
        system = _jwt(
            _public(self._system),
            "SYS",
            {"type": "account", "limits": {**_UNLIMITED, **_ACCOUNT_UNLIMITED}},
            self._operator,
        )
        account = _jwt(
            self.account,
            ACCOUNT_NAME,
            {"type": "account", "limits": {**_UNLIMITED, **_ACCOUNT_UNLIMITED, **_JETSTREAM_UNLIMITED}},
            self._operator,
        )
        return [
            f"operator: {json.dumps(operator)}",
            f"system_account: {json.dumps(_public(self._system))}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f"  {json.dumps(_public(self._system))}: {json.dumps(system)}",
            f"  {json.dumps(self.account)}: {json.dumps(account)}",
            "}",
        ]

    def mint(self, identity: Identity) -> str:
        """A new user of the application account with the identity's permissions, as ``.creds`` text."""
        if identity.role == permissions.NODE:
            error = node_name_error(identity.node_id or "")
            if error:
                raise ValueError(f"{identity.node_id!r}: {error}")
        rules = permissions.rules(identity.role, identity.node_id)
        user_seed = _new_seed(nkeys.PREFIX_BYTE_USER)
        user = nkeys.from_seed(user_seed)
        claims = {"type": "user", **rules.claims(), **_UNLIMITED}
        return creds_text(_jwt(_public(user), identity.user_name, claims, self._account), user_seed)

    def creds_path(self, identity: Identity) -> Path:
        if identity.role == permissions.NODE:
            return self.directory / "nodes" / f"{identity.node_id}.creds"
        return self.directory / f"{identity.role}.creds"

    def write_creds(self, identity: Identity) -> Path:
        """Mint the identity a fresh credential file (mode 0600) and return its path. Earlier
        ones stay valid: the server knows only the account, not its users."""
        path = self.creds_path(identity)
        write_private(path, self.mint(identity))
        return path
