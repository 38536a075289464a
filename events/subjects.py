"""Every NATS subject the system uses, built here and nowhere else.

Subjects read from general to specific: ``infer.chat.<model>``, ``registry.events.model.deleted``.
Model names enter subjects only through :func:`events.tokens.encode_token`.
"""

from __future__ import annotations

from .tokens import encode_token

# Capabilities a model can serve; each has its own inference subject family.
CHAT = "chat"
COMPLETION = "completion"
EMBEDDING = "embedding"
TEXT_CAPABILITIES = (CHAT, COMPLETION, EMBEDDING)
# Capabilities of the multimodal runtimes (images, speech to text, text to speech, vision chat).
IMAGE = "image"
TRANSCRIPTION = "transcription"
TRANSLATION = "translation"
SPEECH = "speech"
VISION = "vision"
KNOWN_CAPABILITIES = (*TEXT_CAPABILITIES, IMAGE, TRANSCRIPTION, TRANSLATION, SPEECH, VISION)

# Queue group every node joins on the shared inference subjects.
INFER_QUEUE = "nodes"


def infer(capability: str, model: str) -> str:
    """Shared subject for a (capability, model): any node that loaded it may answer."""
    return f"infer.{capability}.{encode_token(model)}"


def infer_on_node(capability: str, model: str, node_id: str) -> str:
    """Subject that reaches one chosen node, for load-aware dispatch by the gateway."""
    return f"infer.{capability}.{encode_token(model)}.{encode_token(node_id)}"


def infer_cancel(request_id: str) -> str:
    """A gateway publishes here when a client went away; the node running it stops."""
    return f"infer.cancel.{encode_token(request_id)}"


INFER_CANCEL_ALL = "infer.cancel.*"

# Node presence: a heartbeat every few seconds, a goodbye on clean shutdown.
NODE_HEARTBEAT_ALL = "nodes.heartbeat.*"
NODE_GOODBYE_ALL = "nodes.goodbye.*"


def node_heartbeat(node_id: str) -> str:
    return f"nodes.heartbeat.{encode_token(node_id)}"


def node_goodbye(node_id: str) -> str:
    return f"nodes.goodbye.{encode_token(node_id)}"


# Admin commands to one node: drain (finish in-flight work, take no new work), resume.
NODE_DRAIN = "drain"
NODE_RESUME = "resume"
NODE_DOWNLOAD = "download"  # fetch a model now (sent by the registry for admin.model.download)


def gateway_health(instance_id: str) -> str:
    """A gateway's health over NATS (its micro service's ``health`` endpoint)."""
    return f"gateway.{encode_token(instance_id)}.health"


def admin_node(node_id: str, verb: str) -> str:
    return f"admin.node.{encode_token(node_id)}.{verb}"


# Registry: admin requests (request/reply) and the model events it emits.
ADMIN_MODEL_REGISTER = "admin.model.register"
ADMIN_MODEL_DELETE = "admin.model.delete"
ADMIN_MODEL_HUB = "admin.model.hub"  # the curated catalog with per-entry status
ADMIN_MODEL_HF = "admin.model.hf"  # one page of the Hugging Face GGUF catalog
ADMIN_MODEL_DOWNLOAD = "admin.model.download"  # "download now" on one node, or all
ADMIN_MODEL_PLACE = "admin.model.place"  # a gateway: requests wait for a model no node has loaded
ADMIN_ALL = "admin.>"

REGISTRY_EVENTS_ALL = "registry.events.>"
MODEL_ADDED = "registry.events.model.added"
MODEL_UPDATED = "registry.events.model.updated"
MODEL_DELETED = "registry.events.model.deleted"
MODEL_EVENTS = {"added": MODEL_ADDED, "updated": MODEL_UPDATED, "deleted": MODEL_DELETED}
# Placement decisions (which nodes load a model), one subject per model, published by the
# registry only: `nats sub 'placement.>'` shows every decision as it is made. Outside
# ``registry.events.>`` so that a busy cluster's many decisions never push model events (a
# delete a node that was away must still replay) out of that stream's bounds.
PLACEMENT_PREFIX = "placement."
PLACEMENT_ALL = PLACEMENT_PREFIX + "*"


def placement(model: str) -> str:
    return PLACEMENT_PREFIX + encode_token(model)


# Download progress of a node, live (the ``downloads`` KV bucket keeps the latest of each).
DOWNLOADS_PROGRESS_ALL = "downloads.progress.>"


def downloads_progress(node_id: str, model: str) -> str:
    return f"downloads.progress.{encode_token(node_id)}.{encode_token(model)}"


# HISTORY: ``history.<capability>.<model>.<class>.<status>.<node>.<key>``, one record per request.
# Every filter of ``GET /v0/history`` but free text is a subject filter the server applies from its
# per-subject index (``history.*.*.5xx.>``: the errors; ``history.*.*.*.*.*.key_ab12``: one key's),
# and a consumer's pending count is an exact total. ``-`` stands for no node or no key.
HISTORY_ALL = "history.>"
NONE_TOKEN = "-"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def history(capability: str, model: str, status: int, node_id: str | None, key_id: str | None) -> str:
    """HISTORY stream subject of one request record."""
    node = encode_token(node_id) if node_id else NONE_TOKEN
    key = encode_token(key_id) if key_id else NONE_TOKEN
    return f"history.{capability}.{encode_token(model)}.{status_class(status)}.{status}.{node}.{key}"


def history_filter(
    capability: str | None = None,
    model: str | None = None,
    status: str | None = None,
    node_id: str | None = None,
    key_id: str | None = None,
) -> str:
    """The subject filter of records matching every given field (None: any). ``status`` is a code
    (``503``) or a class (``5xx``); ``node_id``/``key_id`` ``-``: records without one."""
    klass = code = "*"
    if status is not None:
        klass, code = (status, "*") if status.endswith("xx") else (f"{status[0]}xx", status)
    tokens = [
        capability or "*",
        encode_token(model) if model else "*",
        klass,
        code,
        *(encode_token(name) if name else "*" for name in (node_id, key_id)),
    ]
    return "history." + ".".join(tokens)


# LOGS: ``logs.<component>.<instance>.<level>``; the instance of a node is its id.
LOGS_ALL = "logs.>"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def logs(component: str, instance: str, level: str) -> str:
    return f"logs.{component}.{encode_token(instance)}.{level}"


def logs_filter(component: str | None = None, instance: str | None = None, level: str | None = None) -> str:
    return f"logs.{component or '*'}.{encode_token(instance) if instance else '*'}.{level or '*'}"


# Audit log: who did what administrative thing, with what result (the AUDIT stream).
# ``audit.<component>.<noun>.<verb>.<actor>``: an action is always two tokens (``model.register``),
# so one filter picks an action, an actor or both (``audit.*.*.*.key_ab12``) on the server.
AUDIT_ALL = "audit.>"


def audit(component: str, action: str, actor: str) -> str:
    noun, _, verb = action.partition(".")
    return f"audit.{encode_token(component)}.{encode_token(noun)}.{encode_token(verb)}.{encode_token(actor)}"


def audit_filter(component: str | None = None, action: str | None = None, actor: str | None = None) -> str:
    """The subject filter of audit records of ``component``, ``action`` and ``actor`` (None: any)."""
    noun, verb = action.split(".", 1) if action else (None, None)
    tokens = [component, noun, verb, actor]
    return "audit." + ".".join(encode_token(token) if token else "*" for token in tokens)


# Headers the gateway sets on the admin requests it sends for an HTTP client, so the registry's
# audit record names the same actor and request (an operator's `nats req` has neither: "nats").
ACTOR_HEADER = "Llm-Router-Actor"
REQUEST_ID_HEADER = "Llm-Router-Request-Id"
