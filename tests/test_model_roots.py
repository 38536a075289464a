"""Registering a local path: only under a models root (``--model-root``), only with ``admin``.

The paths are real files and symlinks in a temporary tree; the HTTP checks run the real gateway
app in process (httpx.ASGITransport) with keys on, and a real registry, on the session's NATS.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from events.messages import RegisterModel
from gateway import Gateway
from gateway.auth import admin_key, new_key
from llm_router.cli import build_parser
from registry import Registry
from registry.sources import RegistrationError, from_path, model_roots


@pytest.fixture
def tree(tmp_path: Path, tiny_gguf: Path) -> dict[str, Path]:
    """root/ holds a model; outside/ (beside root) holds another, and root/ has links out to it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "inside.gguf").write_bytes(tiny_gguf.read_bytes())
    (outside / "secret.gguf").write_bytes(tiny_gguf.read_bytes())
    (root / "link-out.gguf").symlink_to(outside / "secret.gguf")
    (root / "link-in.gguf").symlink_to(root / "inside.gguf")
    (root / "dir-out").symlink_to(outside, target_is_directory=True)
    return {"root": root, "outside": outside}


def refused(path: Path | str, roots: list[Path], **extra: str) -> str:
    with pytest.raises(RegistrationError) as err:
        from_path(RegisterModel(path=str(path), **extra), roots)
    assert err.value.status == 400, err.value.message
    return err.value.message


def test_without_a_models_root_no_path_registers(tree) -> None:
    message = refused(tree["root"] / "inside.gguf", [])
    assert "--model-root" in message and "LLM_ROUTER_MODEL_ROOTS" in message


def test_outside_the_roots_is_refused_naming_the_roots(tree) -> None:
    roots = model_roots([tree["root"]])
    message = refused(tree["outside"] / "secret.gguf", roots)
    assert str(tree["outside"] / "secret.gguf") in message and str(tree["root"]) in message
    # Refused before anything is looked at: a missing file outside reads the same, not "not found".
    assert "outside this registry's models roots" in refused(tree["outside"] / "nothing.gguf", roots)
    assert "outside" in refused("/etc/passwd", roots)


def test_dotdot_and_symlinks_leading_out_are_refused(tree) -> None:
    roots = model_roots([tree["root"]])
    escape = f"{tree['root']}/../outside/secret.gguf"
    assert "outside this registry's models roots" in refused(escape, roots)
    message = refused(tree["root"] / "link-out.gguf", roots)
    assert str(tree["outside"] / "secret.gguf") in message and "link-out.gguf" in message  # where it really leads
    assert "outside" in refused(tree["root"] / "dir-out" / "secret.gguf", roots)


def test_inside_the_root_registers_links_within_it_too(tree) -> None:
    roots = model_roots([tree["root"]])
    record = from_path(RegisterModel(path=str(tree["root"] / "inside.gguf")), roots)
    assert record.source.path == str((tree["root"] / "inside.gguf").resolve()) and record.name == "inside"
    linked = from_path(RegisterModel(path=str(tree["root"] / "link-in.gguf")), roots)
    assert linked.source.path == record.source.path  # stored resolved: what nodes open
    # A root given through a symlink is compared resolved: its real files are inside it.
    alias = tree["root"].parent / "alias"
    alias.symlink_to(tree["root"], target_is_directory=True)
    assert from_path(RegisterModel(path=str(tree["root"] / "inside.gguf")), model_roots([alias])).name == "inside"
    # Several roots: under any of them is enough.
    both = model_roots([tree["root"], tree["outside"]])
    assert from_path(RegisterModel(path=str(tree["outside"] / "secret.gguf")), both).name == "secret"


def test_a_folder_model_with_a_link_out_is_refused(tree) -> None:
    """A folder's files are read by nodes too: one leading out of the roots refuses the folder.
    (Registration reads only the pipeline index: a diffusers layout with one component will do.)"""
    folder = tree["root"] / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "config.json").write_text("{}")
    roots = model_roots([tree["root"]])
    assert from_path(RegisterModel(path=str(folder)), roots).runtime == "diffusers"
    (folder / "unet" / "weights.bin").symlink_to(tree["outside"] / "secret.gguf")
    message = refused(folder, roots)
    assert "a file of the model folder" in message and str(tree["outside"] / "secret.gguf") in message


def test_a_projector_outside_the_roots_is_refused(tree) -> None:
    pytest.importorskip("gguf")
    from tiny_models import build_tiny_mmproj

    roots = model_roots([tree["root"]])
    projector = build_tiny_mmproj(tree["outside"] / "mmproj-x.gguf")
    message = refused(tree["root"] / "inside.gguf", roots, projector=str(projector))
    assert message.startswith("projector ") and "outside" in message
    (tree["root"] / "mmproj-inside.gguf").symlink_to(projector)  # found beside the model, leading out
    assert refused(tree["root"] / "inside.gguf", roots).startswith("projector ")


def test_model_root_options_and_environment(monkeypatch, capsys) -> None:
    args = build_parser().parse_args(["registry", "--model-root", "/a", "--model-root", "/b"])
    assert args.model_root == ["/a", "/b"]
    assert build_parser().parse_args(["registry"]).model_root is None
    monkeypatch.setenv("LLM_ROUTER_MODEL_ROOTS", "/m1:/m2")
    assert build_parser().parse_args(["up"]).model_root == ["/m1", "/m2"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--help"])
    assert "--model-root DIR" in capsys.readouterr().out


async def test_path_registration_over_http_needs_admin_and_a_root(nats_url, tree, tmp_path) -> None:
    registry = Registry(nats_url=nats_url, model_roots=[tree["root"]])
    gateway = Gateway(nats_url=nats_url)
    await registry.start()
    await gateway.start(serve_http=False)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw")
    try:
        admin, _ = await admin_key(gateway.keys, tmp_path / "admin.key")
        for scopes in (["inference"], ["read"], ["inference", "read"]):
            secret, key = new_key("not-admin", scopes, [], None)
            await gateway.keys.add(key)
            answer = await client.post(
                "/v0/models/register",
                json={"path": str(tree["root"] / "inside.gguf")},
                headers={"authorization": f"Bearer {secret}"},
            )
            assert answer.status_code == 403 and answer.json()["error"]["code"] == "insufficient_scope", answer.text

        def register(path: Path) -> httpx.Response:
            body = {"path": str(path), "name": "roots-http"}
            return client.post("/v0/models/register", json=body, headers={"authorization": f"Bearer {admin}"})

        for outside in (tree["outside"] / "secret.gguf", tree["root"] / "link-out.gguf"):
            answer = await register(outside)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error" and str(tree["root"]) in error["message"]
        answer = await register(tree["root"] / "inside.gguf")
        assert answer.status_code == 201, answer.text
        assert answer.json()["source"]["path"] == str(tree["root"] / "inside.gguf")
    finally:
        await registry.delete("roots-http")
        await client.aclose()
        await gateway.stop()
        await registry.stop()
