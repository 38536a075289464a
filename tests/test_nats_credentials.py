"""NATS credentials: a real nats-server in operator mode refuses what a role's credential does not allow.

The server is ``broker.embedded.EmbeddedNats`` with a ``broker.credentials.Authority``, as
``llm-router up`` runs it; every client connects through ``broker.connect`` with a credential
minted here. A refusal is shown twice: the server answered ``-ERR 'Permissions Violation ...'``
(the client's last error), and a subscriber with operator rights saw nothing arrive.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest
from conftest import Proc, requires_llama, wait_until
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from broker import EmbeddedNats, NatsAuth, connect, payloads, provision
from broker.blobs import blob_info, blob_name, file_sha256, object_sha256, put_file, read_blob
from broker.credentials import Authority, CredentialsError, Identity, identity_of
from broker.logship import LogShipper
from broker.permissions import GATEWAY, NODE, OBSERVER, OPERATOR, REGISTRY
from events import codec, storage, subjects
from events.messages import PlacementEvent

# The longest node name there is: its credential must still fit the server's 4 KB CONNECT line.
NODE_A = "a" * 32
NODE_B = "node-b"


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory):
    """An operator-mode nats-server, provisioned by a gateway: (url, authority)."""
    root = tmp_path_factory.mktemp("authed-nats")
    authority = Authority(root / "nats-auth")
    server = EmbeddedNats(root / "nats", port=0, auth=authority)
    url = server.start_sync()

    async def provision_as_gateway() -> None:
        nc = await connect(url, name="gateway", auth=_auth(authority, Identity(GATEWAY)))
        await provision(nc.jetstream(), role=nc.role)
        await nc.close()

    asyncio.run(provision_as_gateway())
    yield url, authority, server
    server.stop_sync()


@pytest.fixture
async def connected(authed):
    """``await connected(role, node_id=None)``: a client of ``authed`` on that role's credential,
    closed (the last opened first) when the test ends."""
    url, authority, _ = authed
    opened = []

    async def connect_as(role: str, node_id: str | None = None):
        opened.append(await _as(url, authority, role, node_id))
        return opened[-1]

    yield connect_as
    for nc in reversed(opened):
        await nc.close()


def _auth(authority: Authority, identity: Identity) -> NatsAuth:
    return NatsAuth(creds=authority.write_creds(identity))


async def _as(url: str, authority: Authority, role: str, node_id: str | None = None):
    return await connect(url, name=f"test-{role}-{node_id or ''}", auth=_auth(authority, Identity(role, node_id)))


async def _refused(nc, action: str, subject: str) -> None:
    """The server answered what was sent on ``nc`` with a permissions violation on ``subject``."""
    expected = f'permissions violation for {action} to "{subject}"'.lower()  # the server lower-cases it
    await _until(lambda: expected in str(nc.last_error).lower(), timeout=3, what=lambda: str(nc.last_error))


async def _settled(nc) -> None:
    """Everything sent on ``nc`` has been answered (``broker.connection.ResilientClient.flush`` writes
    what is still buffered before its PING)."""
    await nc.flush()


async def _until(predicate, timeout: float = 5.0, what=lambda: "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {what()}"
        await asyncio.sleep(0.02)


class Inbox:
    """What an operator-rights subscriber receives on some subjects."""

    def __init__(self) -> None:
        self.subjects: list[str] = []

    async def on(self, nc, *patterns: str) -> Inbox:
        for pattern in patterns:
            await nc.subscribe(pattern, cb=self._got)
        await nc.flush()
        return self

    async def _got(self, msg) -> None:
        self.subjects.append(msg.subject)


async def test_a_node_cannot_speak_as_the_registry_or_an_admin_nor_touch_models_or_keys(connected) -> None:
    operator = await connected(OPERATOR)
    node = await connected(NODE, NODE_A)
    try:
        assert node.role == NODE and node.identity.node_id == NODE_A
        seen = await Inbox().on(operator, "registry.events.>", "admin.>", "$KV.models.>")
        events_before = (await operator.jetstream().stream_info(storage.REGISTRY_EVENTS)).state.messages

        await node.publish(subjects.MODEL_DELETED, json.dumps({"event": "deleted", "name": "tiny"}).encode())
        await _refused(node, "publish", subjects.MODEL_DELETED)
        await node.publish(subjects.ADMIN_MODEL_DELETE, json.dumps({"name": "tiny"}).encode())
        await _refused(node, "publish", subjects.ADMIN_MODEL_DELETE)

        js = node.jetstream(timeout=1)
        models = await js.key_value(storage.KV_MODELS)  # binding and reading: allowed
        with pytest.raises(nats.errors.TimeoutError):  # the server drops the write: no acknowledgement
            await models.put("tiny", b'{"name": "forged"}')
        await _refused(node, "publish", "$KV.models.tiny")
        with pytest.raises(nats.errors.TimeoutError):
            await js.key_value(storage.KV_KEYS)
        await _refused(node, "publish", "$JS.API.STREAM.INFO.KV_keys")
        with pytest.raises(nats.errors.TimeoutError):
            await node.request("$JS.API.DIRECT.GET.KV_keys.$KV.keys.key_1", b"", timeout=1)
        await _refused(node, "publish", "$JS.API.DIRECT.GET.KV_keys.$KV.keys.key_1")
        await node.subscribe("$KV.keys.>")
        await _refused(node, "subscription", "$KV.keys.>")
        await node.subscribe("_INBOX_llmr.gateway.>")  # where the gateway's key lookups are answered
        await _refused(node, "subscription", "_INBOX_llmr.gateway.>")

        await asyncio.sleep(0.3)
        assert seen.subjects == []
        assert (await operator.jetstream().stream_info(storage.REGISTRY_EVENTS)).state.messages == events_before
        with pytest.raises(KeyNotFoundError):
            await (await operator.jetstream().key_value(storage.KV_MODELS)).get("tiny")

        # The same connection goes on working: no reconnect, its own subjects and the models bucket.
        assert node.is_connected and node.stats["reconnects"] == 0
        last_refusal = node.last_error
        beats = await Inbox().on(operator, subjects.NODE_HEARTBEAT_ALL)
        await node.publish(subjects.node_heartbeat(NODE_A), b"{}")
        await (await operator.jetstream().key_value(storage.KV_MODELS)).put("tiny", b'{"name": "tiny"}')
        assert (await models.get("tiny")).value == b'{"name": "tiny"}'
        await (await js.key_value(storage.KV_NODES)).put(NODE_A, b"{}")
        await _until(
            lambda: beats.subjects, what=lambda: f"operator: {operator.last_error!r}, node: {node.last_error!r}"
        )
        assert beats.subjects == [subjects.node_heartbeat(NODE_A)]
        await _settled(node)
        assert node.last_error is last_refusal  # nothing refused since
    finally:
        await (await operator.jetstream().key_value(storage.KV_MODELS)).purge("tiny")


async def test_one_node_credential_cannot_speak_as_another_node(connected) -> None:
    operator = await connected(OPERATOR)
    node_a = await connected(NODE, NODE_A)
    seen = await Inbox().on(operator, "nodes.>", "downloads.>", "$KV.nodes.>", "$KV.downloads.>")
    for subject in (
        subjects.node_heartbeat(NODE_B),
        subjects.node_goodbye(NODE_B),
        subjects.downloads_progress(NODE_B, "tiny"),
        f"$KV.{storage.KV_NODES}.{NODE_B}",
        f"$KV.{storage.KV_DOWNLOADS}.{storage.download_key(NODE_B, 'tiny')}",
        subjects.admin_node(NODE_B, subjects.NODE_DRAIN),
    ):
        await node_a.publish(subject, b"{}")
        await _refused(node_a, "publish", subject)
    for subject in (
        subjects.admin_node(NODE_B, subjects.NODE_DOWNLOAD),  # its commands
        subjects.infer_on_node("chat", "tiny", NODE_B),  # the requests sent to it alone
        f"_INBOX_llmr.node.{NODE_B}.>",  # the answers to its requests
    ):
        await node_a.subscribe(subject)
        await _refused(node_a, "subscription", subject)
    durable = f"$JS.API.CONSUMER.INFO.{storage.REGISTRY_EVENTS}.node-{NODE_B}"
    with pytest.raises(nats.errors.TimeoutError):  # its durable consumer of registry events
        await node_a.request(durable, b"", timeout=1)
    await _refused(node_a, "publish", durable)
    await asyncio.sleep(0.3)
    assert seen.subjects == []

    # Its own: heartbeat, downloads entry, commands.
    last_refusal = node_a.last_error
    await node_a.publish(subjects.node_heartbeat(NODE_A), b"{}")
    downloads = await node_a.jetstream(timeout=2).key_value(storage.KV_DOWNLOADS)
    await downloads.put(storage.download_key(NODE_A, "tiny"), b"{}")
    await node_a.subscribe(subjects.admin_node(NODE_A, subjects.NODE_DRAIN))
    await _settled(node_a)
    assert node_a.last_error is last_refusal
    await _until(lambda: len(seen.subjects) >= 2)
    own_entry = f"$KV.{storage.KV_DOWNLOADS}.{storage.download_key(NODE_A, 'tiny')}"
    assert set(seen.subjects) == {subjects.node_heartbeat(NODE_A), own_entry}


async def test_a_node_credential_reads_model_files_and_writes_claim_checks_and_leases(connected, tmp_path) -> None:
    """The node's paths the trace of an `up` session does not take: a model file from the
    registry's object store, an image answer through the payloads store, a shared-dir lease."""
    operator = await connected(OPERATOR)
    node = await connected(NODE, NODE_A)
    try:
        model_file = os.urandom(300_000)  # a few chunks
        blobs = await operator.jetstream().object_store(storage.OBJ_MODEL_BLOBS)
        await blobs.put(blob_name("hosted", "hosted.gguf"), model_file)
        js = node.jetstream(timeout=2)
        info = await blob_info(js, blob_name("hosted", "hosted.gguf"))
        out = io.BytesIO()
        await read_blob(js, info, out)
        assert out.getvalue() == model_file

        # What it fetched from the origin, it shares: a new object, never a replaced one.
        fetched = tmp_path / "fetched.gguf"
        fetched.write_bytes(os.urandom(2_500_000))
        shared, written = await put_file(
            js, blob_name("fetched", "fetched.gguf"), fetched, max_payload=node.max_payload
        )
        assert written and object_sha256(shared) == file_sha256(fetched)
        fetched.write_bytes(os.urandom(1000))  # another file under the same name: left alone
        assert await put_file(
            js, blob_name("fetched", "fetched.gguf"), fetched, max_payload=node.max_payload, replace=False
        ) == (None, False)
        assert (await blob_info(js, blob_name("fetched", "fetched.gguf"))).size == 2_500_000

        image = os.urandom(200_000)
        attachment = await payloads.store(js, image, content_type="image/png", filename="image-0.png")
        assert await payloads.load(operator.jetstream(), attachment, consume=True) == image  # the gateway's read
        upload = await payloads.store(operator.jetstream(), b"an upload", content_type="audio/wav")
        assert await payloads.load(js, upload) == b"an upload"  # a node reads what the gateway stored

        leases = await js.key_value(storage.KV_LEASES)
        revision = await leases.create("share=3Ahosted", NODE_A.encode())
        with pytest.raises(KeyWrongLastSequenceError):  # another node holds it: wait
            await leases.create("share=3Ahosted", b"someone else")
        await leases.update("share=3Ahosted", NODE_A.encode(), last=revision)
        await leases.delete("share=3Ahosted")
        await _settled(node)
        assert node.last_error is None
    finally:
        await blobs.delete(blob_name("hosted", "hosted.gguf"))
        if await blob_info(operator.jetstream(), blob_name("fetched", "fetched.gguf")) is not None:
            await blobs.delete(blob_name("fetched", "fetched.gguf"))


async def test_the_observer_reads_streams_and_buckets_but_publishes_nothing(connected) -> None:
    operator = await connected(OPERATOR)
    observer = await connected(OBSERVER)
    try:
        await operator.jetstream().publish(subjects.MODEL_ADDED, b'{"event": "added", "name": "seen"}')
        await (await operator.jetstream().key_value(storage.KV_MODELS)).put("seen", b"{}")
        js = observer.jetstream(timeout=2)
        info = await js.stream_info(storage.REGISTRY_EVENTS)
        assert info.state.messages >= 1
        sub = await js.subscribe(subjects.REGISTRY_EVENTS_ALL, ordered_consumer=True)  # `nats stream view`
        first = await sub.next_msg(timeout=5)
        assert first.subject.startswith("registry.events.")
        await sub.unsubscribe()
        assert (await (await js.key_value(storage.KV_MODELS)).get("seen")).value == b"{}"
        await _settled(observer)
        assert observer.last_error is None

        seen = await Inbox().on(operator, "registry.events.>", "admin.>", "infer.>", "$SRV.>")
        for subject in (subjects.MODEL_DELETED, subjects.ADMIN_MODEL_DELETE, "infer.chat.tiny", "$SRV.PING"):
            await observer.publish(subject, b"{}")
            await _refused(observer, "publish", subject)
        with pytest.raises(nats.errors.TimeoutError):
            await (await js.key_value(storage.KV_MODELS)).put("seen", b"forged")
        await _refused(observer, "publish", "$KV.models.seen")
        with pytest.raises(nats.errors.TimeoutError):
            await js.key_value(storage.KV_KEYS)
        await _refused(observer, "publish", "$JS.API.STREAM.INFO.KV_keys")
        await asyncio.sleep(0.3)
        assert seen.subjects == []
    finally:
        await (await operator.jetstream().key_value(storage.KV_MODELS)).purge("seen")


async def test_the_gateway_cannot_speak_as_the_registry_or_a_node(connected) -> None:
    gateway = await connected(GATEWAY)
    for subject in (subjects.MODEL_ADDED, subjects.node_heartbeat(NODE_A), f"$KV.{storage.KV_MODELS}.tiny"):
        await gateway.publish(subject, b"{}")
        await _refused(gateway, "publish", subject)
    refusal = gateway.last_error
    keys = await gateway.jetstream(timeout=2).key_value(storage.KV_KEYS)  # its own: keys, history, asks
    await keys.put("key_test", b"{}")
    await keys.delete("key_test")
    await gateway.publish(subjects.ADMIN_MODEL_HUB, b"{}")
    await _settled(gateway)
    assert gateway.last_error is refusal


async def test_each_role_ships_its_own_log_records_and_no_one_elses(authed) -> None:
    """The gateway, the registry and a node each publish their log records (broker.logship) on
    their credential, nothing refused; a node cannot write another node's, nor the gateway's."""
    url, authority, _ = authed
    operator = await _as(url, authority, OPERATOR)
    clients = {
        "gateway": await _as(url, authority, GATEWAY),
        "registry": await _as(url, authority, REGISTRY),
        "node": await _as(url, authority, NODE, NODE_B),
    }
    try:
        seen = await Inbox().on(operator, "logs.>")
        for component, nc in clients.items():
            shipper = LogShipper()
            shipper.identity.component, shipper.identity.instance = component, f"creds-{component}"
            shipper.attach(nc, component, NODE_B if component == "node" else None)
            shipper.emit((time.time(), "warning", component, {"event": "shipped", "token": "never shown"}))
            await shipper.detach(nc)  # ships what is buffered first
            await _settled(nc)
            assert shipper.stats == {"pending": 0, "shipped": 1, "dropped": 0}
            assert "logs." not in str(nc.last_error or ""), nc.last_error
        expected = [
            subjects.logs("gateway", "creds-gateway", "warning"),
            subjects.logs("registry", "creds-registry", "warning"),
            subjects.logs("node", NODE_B, "warning"),
        ]
        await _until(lambda: sorted(seen.subjects) == sorted(expected), what=lambda: str(seen.subjects))
        node = clients["node"]
        for forged in (subjects.logs("node", NODE_A, "info"), subjects.logs("gateway", "creds-gateway", "info")):
            await node.publish(forged, b"{}")
            await _refused(node, "publish", forged)
        await asyncio.sleep(0.2)
        assert sorted(seen.subjects) == sorted(expected)
    finally:
        for nc in (operator, *clients.values()):
            await nc.close()


async def test_placement_decisions_come_from_the_registry_alone_and_reach_every_node(authed) -> None:
    url, authority, _ = authed
    registry = await _as(url, authority, REGISTRY)
    node = await _as(url, authority, NODE, NODE_A)
    gateway = await _as(url, authority, GATEWAY)
    subject = subjects.placement("tiny")
    try:
        await provision(registry.jetstream(), role=registry.role)  # the PLACEMENTS stream is one of its own
        heard = await Inbox().on(node, subjects.PLACEMENT_ALL)
        before = (await registry.jetstream().stream_info(storage.PLACEMENTS)).state.messages
        event = PlacementEvent(name="tiny", nodes=[NODE_A], reason="on_demand", evict=True)
        await registry.jetstream().publish(subject, codec.encode(event))
        await _until(lambda: heard.subjects == [subject], what=lambda: str(heard.subjects))
        for speaker in (node, gateway):
            await speaker.publish(subject, b"{}")
            await _refused(speaker, "publish", subject)
        refusal = gateway.last_error
        await gateway.publish(subjects.ADMIN_MODEL_PLACE, b"{}")  # asking the registry for one: allowed
        await _settled(gateway)
        assert gateway.last_error is refusal
        await asyncio.sleep(0.2)
        assert heard.subjects == [subject]
        assert (await registry.jetstream().stream_info(storage.PLACEMENTS)).state.messages == before + 1
    finally:
        for nc in (registry, node, gateway):
            await nc.close()


async def test_nobody_without_a_credential_gets_in(authed) -> None:
    url, authority, _ = authed
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    other = Authority(Path(authority.directory).parent / "another-deployment")  # signed by a stranger
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            url,
            user_credentials=str(other.write_creds(Identity(OPERATOR))),
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )


async def test_a_node_credential_creates_nothing_and_waits_for_what_it_binds(tmp_path) -> None:
    authority = Authority(tmp_path / "nats-auth")
    server = EmbeddedNats(tmp_path / "nats", port=0, auth=authority)
    url = await server.start()
    node = await _as(url, authority, NODE, NODE_B)
    gateway = await _as(url, authority, GATEWAY)
    try:
        with pytest.raises(RuntimeError, match="may not create them: start the gateway"):
            await provision(node.jetstream(timeout=1), role=node.role, timeout=1)
        assert await gateway.jetstream().streams_info() == []
        waiting = asyncio.create_task(provision(node.jetstream(timeout=1), role=node.role, timeout=20))
        await asyncio.sleep(0.6)
        assert not waiting.done()
        await provision(gateway.jetstream(), role=gateway.role)
        await asyncio.wait_for(waiting, 20)
    finally:
        await gateway.close()
        await node.close()
        await server.stop()


async def test_a_data_dir_from_before_authentication_keeps_its_buckets(tmp_path) -> None:
    open_server = EmbeddedNats(tmp_path / "nats", port=0)
    nc = await nats.connect(await open_server.start())
    await provision(nc.jetstream())
    await (await nc.jetstream().key_value(storage.KV_MODELS)).put("kept", b"registered before")
    await nc.close()
    await open_server.stop()

    authority = Authority(tmp_path / "nats-auth")
    server = EmbeddedNats(tmp_path / "nats", port=0, auth=authority)
    operator = await _as(await server.start(), authority, OPERATOR)
    try:
        kv = await operator.jetstream().key_value(storage.KV_MODELS)
        assert (await kv.get("kept")).value == b"registered before"
    finally:
        await operator.close()
        await server.stop()


def test_credential_files_are_private_and_say_who_they_are(tmp_path) -> None:
    authority = Authority(tmp_path / "nats-auth")
    path = authority.write_creds(Identity(NODE, NODE_B))
    assert path == tmp_path / "nats-auth" / "nodes" / f"{NODE_B}.creds"
    for item in [path, *(tmp_path / "nats-auth").glob("*.nk")]:
        assert oct(item.stat().st_mode & 0o777) == "0o600", item
    assert oct((tmp_path / "nats-auth").stat().st_mode & 0o777) == "0o700"
    assert identity_of(path) == Identity(NODE, NODE_B)
    assert identity_of(authority.write_creds(Identity(GATEWAY))).inbox_prefix == "_INBOX_llmr.gateway"
    assert Authority(tmp_path / "nats-auth").account == authority.account  # the keys are made once
    with pytest.raises(ValueError, match="1 to 32 letters"):
        authority.mint(Identity(NODE, "x" * 33))
    with pytest.raises(ValueError, match="1 to 32 letters"):
        authority.mint(Identity(NODE, "a.b"))  # would be two subject tokens
    (tmp_path / "junk.creds").write_text("not a credential")
    with pytest.raises(CredentialsError, match="not a NATS credentials file"):
        identity_of(tmp_path / "junk.creds")


def test_up_hands_its_node_process_the_credential_and_tls_files() -> None:
    """`up --nats-url ... --nats-creds F --nats-tls-ca C`: the node process it starts gets them too."""
    from llm_router.cli import _node_argv, build_parser
    from llm_router.nats_options import nats_auth

    args = build_parser().parse_args(
        ["up", "--nats-url", "tls://n:4222", "--nats-creds", "/c.creds", "--nats-tls-ca", "/ca"]
    )
    node = build_parser().parse_args(_node_argv(args, "tls://n:4222", Path("/d"), nats_auth(args))[3:])
    assert node.command == "node" and nats_auth(node) == NatsAuth(creds=Path("/c.creds"), tls_ca=Path("/ca"))


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )
    return cert, key


class ExternalNats:
    """A nats-server started from a config file an operator wrote (not EmbeddedNats): ``url``."""

    def __init__(self, directory: Path, config: str) -> None:
        from broker import find_nats_server

        conf = directory / "external.conf"
        conf.write_text(f'listen: "127.0.0.1:-1"\nports_file_dir: "{directory}"\n{config}')
        self.proc = subprocess.Popen([find_nats_server(), "-c", str(conf)], stderr=subprocess.DEVNULL)
        ports = directory / f"nats-server_{self.proc.pid}.ports"

        def listening() -> list | None:
            return ports.exists() and json.loads(ports.read_text() or "{}").get("nats")

        self.url = wait_until(listening, timeout=10)[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def test_an_external_server_trusts_the_credentials_through_the_printed_config(tmp_path) -> None:
    """`nats-creds server-config` is all an external nats-server needs; credentials minted later
    work on it with their permissions, without touching it again."""
    from llm_router.cli import main

    data = str(tmp_path / "data")
    assert main(["nats-creds", "server-config", "--data-dir", data, "--out", str(tmp_path / "auth.conf")]) == 0
    server = ExternalNats(tmp_path, f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\ninclude "auth.conf"\n')
    try:
        assert main(["nats-creds", "gateway", "--data-dir", data]) == 0
        assert main(["nats-creds", "node", NODE_B, "--data-dir", data]) == 0
        creds = Path(data) / "nats-auth"
        gateway = await connect(server.url, name="gateway", auth=NatsAuth(creds=creds / "gateway.creds"))
        await provision(gateway.jetstream(), role=gateway.role)
        node = await connect(server.url, name="node", auth=NatsAuth(creds=creds / "nodes" / f"{NODE_B}.creds"))
        await provision(node.jetstream(timeout=2), role=node.role)  # binds: the gateway created all
        await node.publish(subjects.MODEL_DELETED, b"{}")
        await _refused(node, "publish", subjects.MODEL_DELETED)
        await (await node.jetstream().key_value(storage.KV_NODES)).put(NODE_B, b"{}")
        await gateway.close()
        await node.close()
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a certificate with")
async def test_tls_options_reach_the_connection(tmp_path) -> None:
    """An external NATS with TLS: the server's certificate is trusted through --nats-tls-ca."""
    cert, key = _self_signed(tmp_path)
    server = ExternalNats(tmp_path, f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n')
    try:
        url = server.url.replace("nats://", "tls://")
        nc = await connect(url, name="tls", auth=NatsAuth(tls_ca=cert))
        assert nc.is_connected and nc.connected_url.scheme == "tls"
        await nc.close()
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):  # not trusted without the CA
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    finally:
        server.stop()


# ---------------------------------------------------------------- end to end


@pytest.mark.e2e
@requires_llama
def test_up_runs_nats_with_credentials_and_a_node_on_another_machine_joins(tmp_path) -> None:
    """`llm-router up` serves chat with every component on its own credential; a second node joins
    with one minted by `llm-router nats-creds`, serves as the node it names, and nothing is refused."""
    data = tmp_path / "data"
    up = Proc(["up", "--no-auth", "--port", "0", "--nats-port", "0", "--data-dir", str(data), "--demo"])
    remote: Proc | None = None
    try:
        url = up.wait_for(r"LLM Router ready: (http://\S+)/v1  \(NATS (nats://\S+)\)", timeout=90)
        base, nats_url = url.group(1), url.group(2)
        join = up.wait_for(r"llm-router node --nats-url (nats://\S+) --nats-creds NAME\.creds", timeout=10)
        assert join.group(1) == nats_url
        up.wait_for("Serving: tiny-demo")
        auth_dir = data / "nats-auth"
        for name in ("operator", "observer", "gateway", "registry"):
            assert oct((auth_dir / f"{name}.creds").stat().st_mode & 0o777) == "0o600"
        assert len(list((auth_dir / "nodes").glob("*.creds"))) == 1  # up's own node

        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(nats.connect(nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2))

        mint = Proc(["nats-creds", "node", "remote-1", "--data-dir", str(data)])
        assert mint.popen.wait(30) == 0, mint.output()
        creds = Path(mint.wait_for(r"^(\S+\.creds)").group(1))
        assert creds == auth_dir / "nodes" / "remote-1.creds"
        remote = Proc(
            ["node", "--nats-url", nats_url, "--nats-creds", str(creds), "--data-dir", str(tmp_path / "remote")]
            + ["--allow-cpu"]
        )
        assert remote.wait_for(r"node (\S+) ready", timeout=90).group(1) == "remote-1"

        def both_serve() -> bool:
            nodes = httpx.get(base + "/v0/nodes", timeout=10).json()["data"]
            ready = {n["node_id"] for n in nodes if any(m["state"] == "ready" for m in n["models"])}
            return len(ready) == 2 and "remote-1" in ready

        wait_until(both_serve, timeout=60, message=lambda: f"{remote.output()[-2000:]}\n--- up:\n{up.output()[-4000:]}")
        local = next(n["node_id"] for n in httpx.get(base + "/v0/nodes").json()["data"] if n["node_id"] != "remote-1")
        body = {"model": "tiny-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        for node_id, other in ((local, "remote-1"), ("remote-1", local)):  # each node alone, in turn
            assert httpx.post(f"{base}/v0/nodes/{node_id}/drain", timeout=30).status_code == 200
            assert httpx.post(f"{base}/v0/nodes/{other}/resume", timeout=30).status_code == 200
            answer = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-node-id"] == other
        stream = dict(body, stream=True)
        with httpx.stream("POST", base + "/v1/chat/completions", json=stream, timeout=60) as answer:
            assert answer.status_code == 200
            assert any("[DONE]" in line for line in answer.iter_lines())

        # The registry's side: a download order to every node, a registration and its deletion.
        assert httpx.post(f"{base}/v0/nodes/remote-1/resume", timeout=30).status_code == 200

        def all_online() -> bool:
            return all(n["state"] == "online" for n in httpx.get(base + "/v0/nodes", timeout=10).json()["data"])

        wait_until(all_online, timeout=20)
        download = httpx.post(f"{base}/v0/models/tiny-demo/download", json={"all": True}, timeout=30)
        assert download.status_code in (200, 202) and len(download.json()["task"]["nodes"]) == 2, download.text
        second = data / "models" / "second.gguf"
        shutil.copy(data / "models" / "demo" / "tiny-demo.gguf", second)
        registered = httpx.post(f"{base}/v0/models/register", json={"path": str(second), "name": "second"}, timeout=30)
        assert registered.status_code in (200, 201), registered.text
        wait_until(lambda: "second" in [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]], timeout=30)
        assert httpx.delete(f"{base}/v0/models/second", timeout=30).status_code == 200
        remote.wait_for("model unloaded.*second|second.*model unloaded", timeout=30)

        operator_creds = ["--nats-url", nats_url, "--nats-creds", str(auth_dir / "operator.creds")]
        for command in (["keys", *operator_creds, "ls"], ["users", *operator_creds, "ls"]):
            done = Proc(command)
            assert done.popen.wait(30) == 0, done.output()
        log = (data / "nats" / "nats-server.log").read_text(errors="replace")
        refused = re.findall(r".*(?:Publish|Subscription) Violation.*", log)
        assert not refused, refused[:5]

        node_keys = Proc(["keys", *operator_creds[:2], "--nats-creds", str(creds), "ls"])  # a node's: no keys
        assert node_keys.popen.wait(60) != 0
        log = (data / "nats" / "nats-server.log").read_text(errors="replace")
        assert 'Publish Violation - Subject "$JS.API.STREAM.INFO.KV_keys"' in log
    finally:
        if remote is not None:
            assert remote.stop(signal.SIGTERM) == 0, remote.output()[-2000:]
        assert up.stop(signal.SIGTERM) == 0, up.output()[-2000:]
