"""broker/: the embedded server and idempotent provisioning, against a real nats-server."""

import asyncio

import nats

from broker import EmbeddedNats, connect, provision
from events import storage


async def test_provision_is_idempotent(nats_url: str) -> None:
    nc = await connect(nats_url, name="test")
    try:
        js = nc.jetstream()
        await provision(js)
        await provision(js)  # a second component starting must not fail
        names = {info.config.name for info in await js.streams_info()}
        assert {storage.REGISTRY_EVENTS, storage.HISTORY, storage.LOGS} <= names
        assert {"KV_models", "KV_nodes", "KV_downloads", "KV_settings", "OBJ_model-blobs"} <= names
        history = await js.stream_info(storage.HISTORY)
        assert history.config.max_age == 7 * 24 * 3600
    finally:
        await nc.close()


async def test_embedded_server_picks_a_free_port_and_stops(tmp_path) -> None:
    server = EmbeddedNats(tmp_path, port=0)
    url = await server.start()
    assert url.startswith("nats://127.0.0.1:")
    nc = await nats.connect(url)
    assert nc.max_payload >= 8 * 1024 * 1024
    js = nc.jetstream()
    await js.add_stream(name="T", subjects=["t.>"])
    ack = await js.publish("t.x", b"1")
    assert ack.seq == 1
    await nc.close()
    proc = server._proc
    await server.stop()
    assert proc.poll() is not None
    assert (tmp_path / "jetstream").is_dir()  # JetStream data lives in the data dir


async def test_jetstream_survives_restart_in_the_same_data_dir(tmp_path) -> None:
    server = EmbeddedNats(tmp_path, port=0)
    nc = await nats.connect(await server.start())
    await provision(nc.jetstream())
    kv = await nc.jetstream().key_value(storage.KV_MODELS)
    await kv.put("m", b"kept")
    await nc.close()
    await server.stop()
    nc = await nats.connect(await server.start())
    kv = await nc.jetstream().key_value(storage.KV_MODELS)
    assert (await kv.get("m")).value == b"kept"
    await nc.close()
    await server.stop()
    await asyncio.sleep(0)
