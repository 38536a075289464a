"""broker/: the embedded server and idempotent provisioning, against a real nats-server."""

import asyncio
import uuid

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


async def test_a_bucket_is_read_whole_and_a_none_marker_ends_only_an_empty_one(nats_url: str) -> None:
    """nats.py's watcher can yield its "end of the current values" None before the values
    (nats-io/nats.py#842: a consumer-info reply overtakes them), and ``kv.keys()`` then misses
    keys; broker.buckets ends a read where the values say so, so nothing there is missed."""
    from broker.buckets import current_entries, values_end

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    bucket = f"whole-{uuid.uuid4().hex[:8]}"
    kv = await js.create_key_value(bucket=bucket, history=3)
    try:
        assert await values_end(js, bucket, None)  # empty: nats.py's marker is right
        assert await asyncio.wait_for(current_entries(js, bucket), 5) == []
        for key in ("a", "b", "c"):
            await kv.put(key, key.encode())
        await kv.put("a", b"a2")
        await kv.delete("c")  # the last message is a delete marker: it ends the values too
        assert not await values_end(js, bucket, None)  # values there: a None must not end the read
        entries = await asyncio.wait_for(current_entries(js, bucket), 5)
        assert sorted((e.key, e.value) for e in entries) == [("a", b"a2"), ("b", b"b")]
        await kv.put("d", b"d")
        assert sorted(e.key for e in await current_entries(js, bucket)) == ["a", "b", "d"]
        await kv.put("p.x.one", b"1")
        await kv.put("p.y.one", b"2")
        await kv.put("p.x.two", b"3")
        entries = await asyncio.wait_for(current_entries(js, bucket, "p.*.one"), 5)  # a pattern: only its keys
        assert sorted(e.key for e in entries) == ["p.x.one", "p.y.one"]
        assert not await values_end(js, bucket, None, "p.*.one")  # values for the pattern: not the end
        assert await values_end(js, bucket, None, "p.*.none")  # none for it, though the bucket has some
        assert await asyncio.wait_for(current_entries(js, bucket, "p.*.none"), 5) == []
    finally:
        await js.delete_key_value(bucket)
        await nc.close()
