"""``llm-router nats-creds``: NATS credentials of the embedded server, minted offline.

``up`` (without ``--nats-url``) runs nats-server in operator mode and writes one credential per
role into ``<data-dir>/nats-auth/`` at every start, and one for its own node. A node on another
machine gets its own with ``llm-router nats-creds node NAME``: the file is all it needs to join,
and it speaks only as node NAME. Nothing is sent to the server: it trusts what the account key
signed. ``llm-router nats-creds server-config`` prints the server side of the same authority
(operator and accounts, no secret), for an external nats-server or a cluster of them.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import NatsAuth
from broker.credentials import Authority, Identity, node_name_error, write_private
from broker.permissions import GATEWAY, NODE, OBSERVER, OPERATOR, REGISTRY, ROLES

AUTH_DIR = "nats-auth"
SERVER_CONFIG = "server-config"


def add_creds_command(commands: Any, add: Callable[..., None], data_dir_option: Callable[[Any], None]) -> None:
    creds = commands.add_parser(
        "nats-creds",
        help="mint a NATS credential of the embedded server (`up`): for a node on another machine, or a role",
    )
    creds.add_argument(
        "role",
        choices=[NODE, *ROLES, SERVER_CONFIG],
        help=f"node (one per node: give its NAME), a role, or {SERVER_CONFIG}: the nats-server config lines "
        "that trust these credentials (to include in an external server's config)",
    )
    creds.add_argument("name", nargs="?", help="the node's name (its node id): letters, digits, '-', '_'")
    creds.add_argument("--out", metavar="FILE", help=f"where to write it (default: <data-dir>/{AUTH_DIR}/...)")
    data_dir_option(creds)


def run_creds_command(args: argparse.Namespace) -> int:
    if (args.role == NODE) != bool(args.name):
        print("llm-router: nats-creds: a NAME for a node, and only for a node", file=sys.stderr)
        return 2
    if args.role == NODE and node_name_error(args.name):
        print(f"llm-router: nats-creds: {args.name!r}: {node_name_error(args.name)}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).expanduser().resolve()
    authority = Authority(data_dir / AUTH_DIR)
    if args.role == SERVER_CONFIG:
        text = "\n".join(authority.server_config()) + "\n"
        if args.out:
            write_private(Path(args.out).expanduser(), text)
        else:
            sys.stdout.write(text)
        return 0
    identity = Identity(args.role, args.name)
    path = Path(args.out).expanduser() if args.out else authority.creds_path(identity)
    write_private(path, authority.mint(identity))
    print(f"{path}  (mode 0600: a secret; NATS identity {identity.user_name})")
    if args.role == NODE:
        print(
            f"Copy it to the node's machine, then: llm-router node --nats-url nats://<this machine>:<NATS port> "
            f"--nats-creds {path.name}"
        )
    return 0


def embedded_credentials(data_dir: Path, node_id: str) -> tuple[Authority, dict[str, NatsAuth]]:
    """The authority of ``up``'s embedded server, and fresh credentials for the gateway, the
    registry and ``up``'s node (and operator/observer ones for people, beside them)."""
    if node_name_error(node_id):
        raise RuntimeError(f"node id {node_id!r} (in {data_dir / 'node' / 'node-id'}): {node_name_error(node_id)}")
    authority = Authority(data_dir / AUTH_DIR)
    for role in (OPERATOR, OBSERVER):
        authority.write_creds(Identity(role))
    auths = {role: NatsAuth(creds=authority.write_creds(Identity(role))) for role in (GATEWAY, REGISTRY)}
    auths[NODE] = NatsAuth(creds=authority.write_creds(Identity(NODE, node_id)))
    return authority, auths


def join_instructions(data_dir: Path, host: str, url: str) -> str:
    """What ``up`` prints: where the credentials are, and how a node on another machine joins."""
    port = url.rsplit(":", 1)[1]
    auth_dir = data_dir / AUTH_DIR
    try:
        loopback = ipaddress.ip_address(host).is_loopback
        reachable = socket.gethostname() if ipaddress.ip_address(host).is_unspecified else host
    except ValueError:
        loopback, reachable = host == "localhost", host
    lines = [
        f"NATS requires credentials ({auth_dir}, mode 0600): the nats CLI and `llm-router keys` take "
        f"--creds / --nats-creds {auth_dir / 'operator.creds'} (observer.creds: read only).",
        f"A node on another machine: `llm-router nats-creds node NAME --data-dir {data_dir}` here, copy the file "
        f"there, then `llm-router node --nats-url nats://{reachable}:{port} --nats-creds NAME.creds`",
    ]
    if loopback:
        lines[-1] += f" (NATS listens on {host} only: start `up` with --nats-host 0.0.0.0 for that)"
    return "\n".join(lines)
