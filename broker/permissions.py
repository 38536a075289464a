"""What each NATS role may publish and subscribe, and which streams it creates: its credential's rules.

Roles: ``gateway``, ``registry``, ``operator`` (everything: the NATS CLI's admin commands,
``llm-router keys``), ``observer`` (reads, publishes nothing an application listens to) and
``node``, one identity per node: a node's rules name its own node id wherever the subject or
key layout has it (heartbeat, goodbye, admin subjects, its ``downloads`` entries, its durable
consumer), so one node's credential cannot speak as another node.

Nodes, the registry and observers have allow lists, with deny lists for what must never pass
even where a wildcard would reach it (the secret buckets, above all: a JetStream API subject
naming a stream has the same shape for every stream). The gateway, which holds the secrets
anyway, has only a deny list: what it must not do is speak as the registry or a node. Three
rules the lists depend on:

- Each component has its own inbox prefix (``_INBOX_llmr.gateway``, ``_INBOX_llmr.node.<id>``):
  replies to the gateway's JetStream requests (an API key lookup, say) land under the gateway's
  prefix, which neither the registry, a node nor an observer may subscribe to or publish on.
  The NATS CLI keeps ``_INBOX``.
- A node answers requests through the server's response permission (``resp``): it may publish
  a reply only to the reply subject of a message it received, for ``REPLY_TTL_S``. So nobody
  may publish on a subject nodes serve (``infer.>``, ``admin.node.>``, ``$SRV.>``) but the
  gateway, the registry and the operator: whoever sends a node a request chooses where its
  answer goes.
- A node creates no stream, bucket or store (``creates``): it could otherwise change a
  bucket's config (``STREAM.UPDATE``: its subjects, a republish of every write). It waits for
  the ones it uses (``binds``) instead; the gateway creates all of them, the registry its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from events import encode_token, storage, subjects

GATEWAY = "gateway"
REGISTRY = "registry"
OPERATOR = "operator"
OBSERVER = "observer"
NODE = "node"
ROLES = (GATEWAY, REGISTRY, OPERATOR, OBSERVER)  # one credential each; nodes have one per node

INBOX_ROOT = "_INBOX_llmr"  # components' inboxes, out of reach of a subscription to `_INBOX.>`
CLI_INBOX = "_INBOX"  # nats-py's and the NATS CLI's default

# How long a node may answer a request it received: longer than any request runs (the
# gateway's --request-timeout, 600 s by default). The server keeps one small entry per request
# for that long, then drops it.
REPLY_TTL_S = 3600

# Streams that hold secrets or other people's data: only the gateway (and the operator) reach them.
AUDIT = storage.AUDIT  # the audit log's stream (who did what)
# Stored responses (storage.KV_RESPONSES) are people's conversations: nodes and observers get none of them.
SECRET_BUCKETS = (storage.KV_KEYS, storage.KV_USERS, storage.KV_SESSIONS, storage.KV_SETTINGS, storage.KV_RESPONSES)


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def obj_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


SECRET_STREAMS = tuple(kv_stream(b) for b in SECRET_BUCKETS)
PRIVATE_STREAMS = (*SECRET_STREAMS, storage.HISTORY, AUDIT)  # request bodies and who did what

# What a node uses, and the registry creates (the gateway creates everything).
NODE_STREAMS = frozenset(
    {
        storage.REGISTRY_EVENTS,
        kv_stream(storage.KV_MODELS),
        kv_stream(storage.KV_NODES),
        kv_stream(storage.KV_DOWNLOADS),
        kv_stream(storage.KV_LEASES),
        obj_stream(storage.OBJ_MODEL_BLOBS),
        obj_stream(storage.OBJ_PAYLOADS),
    }
)
REGISTRY_STREAMS = frozenset(
    {
        storage.REGISTRY_EVENTS,
        storage.PLACEMENTS,
        kv_stream(storage.KV_MODELS),
        kv_stream(storage.KV_NODES),
        kv_stream(storage.KV_DOWNLOADS),
        obj_stream(storage.OBJ_MODEL_BLOBS),
    }
)


@dataclass(frozen=True)
class Rules:
    """One identity's permissions, as a user JWT carries them (empty lists: no limit)."""

    pub_allow: tuple[str, ...] = ()
    pub_deny: tuple[str, ...] = ()
    sub_allow: tuple[str, ...] = ()
    sub_deny: tuple[str, ...] = ()
    answers_requests: bool = False  # the server's response permission, for REPLY_TTL_S

    def claims(self) -> dict:
        """The ``pub``/``sub``/``resp`` part of the user JWT's ``nats`` claims."""
        out: dict = {}
        for name, allow, deny in (("pub", self.pub_allow, self.pub_deny), ("sub", self.sub_allow, self.sub_deny)):
            rule = {key: list(value) for key, value in (("allow", allow), ("deny", deny)) if value}
            if rule:
                out[name] = rule
        if self.answers_requests:
            out["resp"] = {"max": -1, "ttl": REPLY_TTL_S * 1_000_000_000}  # unlimited messages; ns
        return out


def inbox_prefix(role: str, node_id: str | None = None) -> str:
    """The inbox prefix a component connects with (nats-py's ``inbox_prefix``)."""
    if role == NODE:
        return f"{INBOX_ROOT}.{NODE}.{encode_token(_required(node_id))}"
    if role in (GATEWAY, REGISTRY):
        return f"{INBOX_ROOT}.{role}"
    return CLI_INBOX


def creates(role: str | None) -> frozenset[str] | None:
    """Streams the role provisions (None: all of them; a component without our credentials too)."""
    if role == REGISTRY:
        return REGISTRY_STREAMS
    if role in (NODE, OBSERVER):
        return frozenset()
    return None


def binds(role: str | None) -> frozenset[str]:
    """Streams the role uses but may not create: it waits for them (a node started first)."""
    return NODE_STREAMS if role == NODE else frozenset()


def rules(role: str, node_id: str | None = None) -> Rules:
    if role == NODE:
        return node_rules(_required(node_id))
    if role == GATEWAY:
        return gateway_rules()
    if role == REGISTRY:
        return registry_rules()
    if role == OBSERVER:
        return observer_rules()
    if role == OPERATOR:
        return Rules()
    raise ValueError(f"unknown NATS role {role!r}")


def _required(node_id: str | None) -> str:
    if not node_id:
        raise ValueError("a node credential needs the node's id")
    return node_id


# ---------------------------------------------------------------- JetStream API subjects
# A user JWT travels in the CONNECT line, which nats-server caps at 4 KB (max_control_line):
# the lists name what nats-py sends (nats-server's trace of a whole `up` session) and no more.


def _api_on(stream: str) -> list[str]:
    """Every JetStream API subject that names ``stream``: the stream is the 5th token
    (``STREAM.INFO.S``, ``DIRECT.GET.S.<subject>``, ``CONSUMER.CREATE.S.<name>``) or the 6th
    (``STREAM.MSG.GET.S``, ``CONSUMER.DURABLE.CREATE.S.<name>``, ``CONSUMER.MSG.NEXT.S.<name>``)."""
    return [f"$JS.API.*.*.{stream}", f"$JS.API.*.*.{stream}.>", f"$JS.API.*.*.*.{stream}", f"$JS.API.*.*.*.{stream}.>"]


def _api_read(stream: str) -> list[str]:
    """Read a stream, a bucket or a store: stored-message and direct gets, and consumers of one's
    own (a KV watcher, ``keys()``, an object read: ephemeral, named by the server)."""
    return [
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
    ]


def _denied_private(*, keep: tuple[str, ...] = ()) -> list[str]:
    """Publish denies for a role whose allow list has API wildcards: reading or writing any
    private stream not in ``keep``."""
    out = []
    for stream in PRIVATE_STREAMS:
        if stream not in keep:
            out += _api_on(stream)
    out += [f"$KV.{bucket}.>" for bucket in SECRET_BUCKETS if kv_stream(bucket) not in keep]
    return out


# Never a node's or the registry's: the allow lists do not reach these, the denies say so twice.
_NOT_THEIRS = [subjects.HISTORY_ALL, "audit.>", *(f"$KV.{bucket}.>" for bucket in SECRET_BUCKETS)]


def node_rules(node_id: str) -> Rules:
    node = encode_token(node_id)
    durable = f"node-{node}"  # nodes.agent.NodeAgent._durable
    events = storage.REGISTRY_EVENTS
    pub = [
        subjects.node_heartbeat(node_id),
        subjects.node_goodbye(node_id),
        f"downloads.progress.{node}.*",
        f"logs.node.{node}.*",  # its log records, one subject per level (events.subjects.logs)
        f"$KV.{storage.KV_NODES}.{node}",
        f"$KV.{storage.KV_DOWNLOADS}.progress.{node}.*",  # its storage.download_key entries
        f"$KV.{storage.KV_LEASES}.*",
        f"$O.{storage.OBJ_PAYLOADS}.*.*",  # generated images and audio (claim checks): chunks, metadata
        # Files it fetched from the origin, for the next node (chunks, metadata; it may not
        # purge, so it never replaces an object: nodes/downloads.py checks first).
        f"$O.{storage.OBJ_MODEL_BLOBS}.C.*",
        f"$O.{storage.OBJ_MODEL_BLOBS}.M.*",
        "$JS.API.STREAM.NAMES",  # the stream of a subject, for a subscription
        "$JS.FC.>",  # flow control of its consumers
        *(f"$JS.API.STREAM.INFO.{stream}" for stream in sorted(NODE_STREAMS)),
        *_api_read(kv_stream(storage.KV_MODELS)),
        *_api_read(kv_stream(storage.KV_LEASES)),
        *_api_read(obj_stream(storage.OBJ_MODEL_BLOBS)),
        *_api_read(obj_stream(storage.OBJ_PAYLOADS)),
        # Its durable consumer of registry events: created, bound again, acknowledged, by name.
        f"$JS.API.CONSUMER.DURABLE.CREATE.{events}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{events}.{durable}.>",
        f"$JS.API.CONSUMER.INFO.{events}.{durable}",
        f"$JS.ACK.{events}.{durable}.>",
        f"$JS.ACK.*.*.{events}.{durable}.>",  # the acknowledgement subjects' v2 form (domain, account hash)
    ]
    deny = [
        subjects.REGISTRY_EVENTS_ALL,
        subjects.PLACEMENT_PREFIX + ">",
        subjects.ADMIN_ALL,
        f"$KV.{storage.KV_MODELS}.>",
        *_NOT_THEIRS,
    ]
    sub = [
        subjects.PLACEMENT_ALL,  # the registry's decisions: which models to load
        "infer.*.*",  # the shared subject of each (capability, model), and cancels
        f"infer.*.*.{node}",  # its own
        f"admin.node.{node}.*",
        "$SRV.*",  # `nats micro ls|info|stats`: all services, services by name, this one
        "$SRV.*.*",
        f"$SRV.*.*.{node}",
        inbox_prefix(NODE, node_id) + ".>",
    ]
    return Rules(pub_allow=tuple(pub), pub_deny=tuple(deny), sub_allow=tuple(sub), answers_requests=True)


def gateway_rules() -> Rules:
    """The HTTP front, the most trusted component (it holds the keys, users and sessions, and
    creates every stream): anything but speaking as the registry or a node. A deny list, so that
    what the gateway comes to publish or subscribe next needs no change here."""
    deny = [
        subjects.REGISTRY_EVENTS_ALL,
        subjects.PLACEMENT_PREFIX + ">",
        subjects.NODE_HEARTBEAT_ALL,
        subjects.DOWNLOADS_PROGRESS_ALL,
        f"$KV.{storage.KV_MODELS}.>",
        f"$KV.{storage.KV_NODES}.>",
    ]
    return Rules(pub_deny=tuple(deny))  # goodbyes it may send: `up` says one for a node process that died


def registry_rules() -> Rules:
    """The model registry: writes ``models``, download tasks and model files, emits registry
    events and placement decisions, asks nodes to download, appends its own audit records;
    reaches no secret or history."""
    pub = [
        subjects.REGISTRY_EVENTS_ALL,
        subjects.PLACEMENT_PREFIX + ">",  # its placement decisions
        "audit.registry.>",  # the admin.model.* requests it carried out (broker/audit.py)
        f"admin.node.*.{subjects.NODE_DOWNLOAD}",
        "logs.registry.*.*",
        f"$KV.{storage.KV_MODELS}.>",
        f"$KV.{storage.KV_DOWNLOADS}.>",
        f"$O.{storage.OBJ_MODEL_BLOBS}.>",
        "$JS.API.STREAM.NAMES",
        "$JS.FC.>",  # its watchers and object listings are ordered consumers: flow control, no acks
        f"$JS.API.STREAM.PURGE.{obj_stream(storage.OBJ_MODEL_BLOBS)}",  # a deleted model's files
    ]
    for stream in sorted(REGISTRY_STREAMS):
        pub += [f"$JS.API.STREAM.{verb}.{stream}" for verb in ("INFO", "CREATE", "UPDATE")]
        pub += _api_read(stream)
    sub = [
        inbox_prefix(REGISTRY) + ".>",
        "admin.model.*",
        "$SRV.>",
        subjects.NODE_HEARTBEAT_ALL,
        subjects.NODE_GOODBYE_ALL,
        subjects.DOWNLOADS_PROGRESS_ALL,
    ]
    deny = ["infer.>", *(s for s in _NOT_THEIRS if s != "audit.>")]  # allow-listed: only its own audit subjects
    return Rules(pub_allow=tuple(pub), pub_deny=tuple(deny), sub_allow=tuple(sub), answers_requests=True)


def observer_rules() -> Rules:
    """Read-only, for people with the NATS CLI: stream and consumer info, direct gets, consumers
    to read through (``nats stream view``, ``nats kv get``), core subscriptions. Nothing an
    application listens to, so no ``$SRV`` requests either (a node's answer goes where the
    request says); nothing of the secret buckets or the components' inboxes (where the answers
    to their JetStream requests land). History and audit records it may read."""
    pub = [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.INFO.*",
        "$JS.API.CONSUMER.NAMES.*",
        "$JS.API.CONSUMER.LIST.*",
        "$JS.API.CONSUMER.INFO.*.*",
        "$JS.API.DIRECT.GET.>",
        "$JS.API.STREAM.MSG.GET.*",
        "$JS.API.CONSUMER.CREATE.>",
        "$JS.API.CONSUMER.MSG.NEXT.>",
        "$JS.API.CONSUMER.DELETE.*.*",
        "$JS.ACK.>",  # its consumers' names are its own choice, so acks cannot be limited to them
        "$JS.FC.>",
    ]
    deny = [
        *_denied_private(keep=(storage.HISTORY, AUDIT)),
        f"$JS.API.CONSUMER.DELETE.{storage.REGISTRY_EVENTS}.*",  # the nodes' durables
    ]
    sub_deny = [f"{INBOX_ROOT}.>", *(f"$KV.{bucket}.>" for bucket in SECRET_BUCKETS)]
    return Rules(pub_allow=tuple(pub), pub_deny=tuple(deny), sub_allow=(">",), sub_deny=tuple(sub_deny))
