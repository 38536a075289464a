"""``llm-router up``: one command serves the openai SDK and stops cleanly, leaving no child process."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import psutil
import pytest
from conftest import Proc, requires_llama

pytestmark = [pytest.mark.e2e, requires_llama]


def _children(proc: Proc) -> list[psutil.Process]:
    return psutil.Process(proc.popen.pid).children(recursive=True)


def test_up_with_a_model_serves_the_sdk_and_stops_cleanly(tiny_gguf, tmp_path) -> None:
    up = Proc(
        ["up", "--port", "0", "--nats-port", "0", "--data-dir", str(tmp_path / "data"), "--model", str(tiny_gguf)]
    )
    try:
        key = up.wait_for(r"Admin API key \(shown once; kept in (\S+), mode 0600\): (sk-llmr-\S+)", timeout=60)
        url = up.wait_for(r"LLM Router ready: (http://\S+)/v1", timeout=60).group(1)
        up.wait_for("Serving: tiny")
        children = _children(up)
        assert any("nats-server" in c.name() for c in children)
        assert oct(os.stat(key.group(1)).st_mode & 0o777) == "0o600"

        with pytest.raises(openai.AuthenticationError):  # keys are on by default
            openai.OpenAI(base_url=url + "/v1", api_key="sk-llmr-wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key=key.group(2), max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert out.usage.total_tokens > 0
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert err.value.code == "model_not_found"
        assert len(client.embeddings.create(model="tiny", input=["a", "b"]).data) == 2
    finally:
        code = up.stop(signal.SIGTERM)
    assert code == 0, up.output()[-2000:]
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_up_without_models_says_how_to_add_one(tmp_path) -> None:
    up = Proc(["up", "--port", "0", "--nats-port", "0", "--data-dir", str(tmp_path)])
    try:
        up.wait_for("No model yet", timeout=60)
    finally:
        assert up.stop(signal.SIGINT) == 0


def test_up_demo_serves_a_labelled_plumbing_model(tmp_path) -> None:
    up = Proc(["up", "--port", "0", "--nats-port", "0", "--data-dir", str(tmp_path), "--demo"])
    try:
        key = up.wait_for(r"Admin API key \(shown once.*\): (sk-llmr-\S+)", timeout=60).group(1)
        url = up.wait_for(r"LLM Router ready: (http://\S+)/v1", timeout=60).group(1)
        up.wait_for("plumbing demo")
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert (
            client.chat.completions.create(
                model="tiny-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            .choices[0]
            .message.role
            == "assistant"
        )
    finally:
        assert up.stop() == 0
    assert (tmp_path / "models" / "demo" / "tiny-demo.gguf").stat().st_size > 0


def test_up_rejects_an_unrecognised_model_file(tmp_path) -> None:
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("not a model")
    up = Proc(["up", "--port", "0", "--nats-port", "0", "--data-dir", str(tmp_path / "d"), "--model", str(bogus)])
    up.wait_for("cannot register .*unrecognised model file", timeout=60)
    assert up.popen.wait(20) == 2


def test_help_documents_environment_defaults() -> None:
    helptext = Proc(["up", "--help"])
    helptext.popen.wait(20)
    out = helptext.output()
    assert "LLM_ROUTER_PORT" in out and "LLM_ROUTER_NATS_URL" in out and "--demo" in out


def _chat_ok(url: str) -> bool:
    import httpx

    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    try:
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def _long_stream(url: str, out: dict) -> None:
    """A stream that would run for long (the end tokens forbidden, most of a 4096-token context:
    the tiny model writes thousands of tokens a second), its last line kept."""
    import httpx

    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4000,
        "stream": True,
        "logit_bias": {"2": -100, "4": -100},
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as answer:
        for line in answer.iter_lines():
            if line:
                out["started"], out["last"] = True, line
            if "error" in line:
                break
    out["at"] = time.monotonic()


def test_up_restarts_a_killed_node_process_and_a_killed_nats_server(tmp_path) -> None:
    """The engines run in their own process: kill -9 costs the requests on it, never the endpoint."""
    from conftest import wait_until

    from nodes.demo_model import write_tiny_gguf

    tiny_gguf = write_tiny_gguf(tmp_path / "models" / "tiny.gguf", context_length=4096)

    up = Proc(
        [
            "up",
            "--no-auth",
            "--port",
            "0",
            "--nats-port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            "--model",
            str(tiny_gguf),
        ]
    )
    try:
        url = up.wait_for(r"LLM Router ready: (http://\S+)/v1", timeout=60).group(1)
        assert _chat_ok(url)
        node = next(c for c in _children(up) if "llm_router" in " ".join(c.cmdline()) and "node" in c.cmdline())
        ended: dict = {}
        stream = threading.Thread(target=_long_stream, args=(url, ended), daemon=True)
        stream.start()
        wait_until(lambda: ended.get("started"), timeout=10, message="stream started")
        killed = time.monotonic()
        node.kill()
        up.wait_for("process died; restarting it", timeout=10)
        stream.join(30)
        # up tells the gateway at once: the stream ends with an error event, not after the heartbeat TTL.
        assert "node_unavailable" in ended["last"], ended
        assert ended["at"] - killed < 3.0, ended["at"] - killed
        started = wait_until(lambda: _chat_ok(url), timeout=30, message=lambda: up.output()[-3000:])
        assert started
        new_node = next(c for c in _children(up) if "node" in c.cmdline() and c.pid != node.pid)
        assert new_node.is_running()

        server = next(c for c in _children(up) if "nats-server" in c.name())
        server.kill()
        up.wait_for("embedded nats-server died; starting it again", timeout=10)
        wait_until(lambda: _chat_ok(url), timeout=20, message=lambda: up.output()[-3000:])
    finally:
        code = up.stop(signal.SIGTERM)
    assert code == 0, up.output()[-2000:]
