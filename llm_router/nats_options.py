"""The options of every command that connects to NATS: a credentials file and TLS files.

One helper for all of them (``up``, ``gateway``, ``registry``, ``node``, ``keys``, ...), each
with its ``LLM_ROUTER_`` environment default, read into a ``broker.NatsAuth``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import NatsAuth
from broker.connection import AUTH_ENV
from broker.permissions import OPERATOR

_HELP = {
    "creds": "NATS credentials file (.creds: user JWT and seed), e.g. one from `llm-router nats-creds`",
    "tls_ca": "CA certificate (PEM) to verify the NATS server's TLS certificate by",
    "tls_cert": "client certificate (PEM) for a NATS server that asks for one",
    "tls_key": "private key (PEM) of --nats-tls-cert",
}


def add_nats_auth_options(parser: argparse.ArgumentParser, add: Callable[..., None]) -> None:
    """``--nats-creds``, ``--nats-tls-ca``, ``--nats-tls-cert``, ``--nats-tls-key`` (``add``: cli._add)."""
    for field, env_name in AUTH_ENV.items():
        add(parser, "--nats-" + field.replace("_", "-"), env_name, None, _HELP[field], metavar="FILE")


def nats_auth(args: argparse.Namespace) -> NatsAuth:
    values = {field: getattr(args, "nats_" + field, None) for field in AUTH_ENV}
    return NatsAuth(**{field: Path(value).expanduser() for field, value in values.items() if value})


def checked_nats_auth(args: argparse.Namespace, role: str) -> NatsAuth:
    """:func:`nats_auth`, refused at once when its credential (one of ours) is another role's: a
    node on the gateway's credential would otherwise run with every heartbeat refused."""
    auth = nats_auth(args)
    identity = auth.identity()
    if identity is not None and identity.role not in (role, OPERATOR):
        raise RuntimeError(f"--nats-creds {auth.creds} is the {identity.user_name} credential, not a {role}'s")
    return auth


def nats_auth_argv(auth: NatsAuth) -> list[str]:
    """The same options on a command line (for a child process)."""
    argv: list[str] = []
    for field in AUTH_ENV:
        value: Any = getattr(auth, field)
        if value is not None:
            argv += ["--nats-" + field.replace("_", "-"), str(value)]
    return argv
