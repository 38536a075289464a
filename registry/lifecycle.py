"""A model's lifecycle state, derived from what live nodes report.

registered → downloading → ready, or error; ``pending_conversion`` is set at registration and
left alone (no node ever receives such a model). ``ready`` means at least one live node has a
non-empty artifact loaded, or has its files and would load it on demand; when the last such
node goes away the model is ``registered`` again.
"""

from __future__ import annotations

from dataclasses import dataclass

from events.messages import DownloadProgress, ModelRecord, ModelState, NodeHeartbeat


@dataclass(frozen=True)
class Lifecycle:
    state: ModelState
    error: str | None = None
    download: DownloadProgress | None = None


def derive(record: ModelRecord, beats: list[NodeHeartbeat], downloads: list[DownloadProgress]) -> Lifecycle:
    """``beats``: live nodes' last heartbeats; ``downloads``: fresh progress reports for this model."""
    if record.state == "pending_conversion":
        return Lifecycle("pending_conversion", record.error)
    if any(beat.serves(record.name) or beat.can_load(record.name) for beat in beats):
        return Lifecycle("ready")
    running = [d for d in downloads if d.state == "running"]
    reported = [(beat.node_id, m) for beat in beats for m in beat.models if m.name == record.name]
    if running or any(m.state == "downloading" for _, m in reported):
        best = max(running, key=lambda d: (d.fraction or 0.0, d.bytes_done), default=None)
        return Lifecycle("downloading", download=best)
    errors = [f"node {d.node_id}: {d.error}" for d in downloads if d.state == "failed" and d.error]
    errors += [f"node {node}: {m.error}" for node, m in reported if m.state == "error" and m.error]
    if errors:
        return Lifecycle("error", "; ".join(errors))
    return Lifecycle("registered")


def differs(record: ModelRecord, now: Lifecycle) -> bool:
    if record.state != now.state or record.error != now.error:
        return True
    before, after = record.download, now.download
    if (before is None) != (after is None):
        return True
    return (
        before is not None
        and after is not None
        and (before.bytes_done, before.node_id) != (after.bytes_done, after.node_id)
    )
