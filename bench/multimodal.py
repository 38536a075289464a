"""What the router adds to the image and audio endpoints, over calling the engine directly.

    python bench/multimodal.py                           # ~1 min on 2 cores
    python bench/multimodal.py --rounds 30 --output docs/benchmarks.md

The tiny models of ``tests/tiny_models.py`` are built in a temporary folder, then:

- ``direct``: each engine (``DiffusersRuntime``, ``FasterWhisperRuntime``, ``PiperRuntime``)
  loaded in this process and called as the node calls it (``nodes/media.py``): generate /
  edit / variation returning PNG bytes, transcribe + render to JSON, speak + encode to WAV;
- ``gateway``: ``llm-router up --model SD_DIR --model WHISPER_DIR --model VOICE.onnx`` (NATS,
  registry, gateway and node in one process, the single-machine default, which also checks
  that ``up`` takes all three kinds of local model), asked over HTTP on 127.0.0.1 with the
  same inputs: multipart uploads, claim checks, base64 images, raw audio answers.

Rounds alternate direct and gateway calls, so both see the same machine state; the table
gives medians and the ratio. A second table times the claim check alone (store, then read and
delete, of 2-25 MB payloads in the ``payloads`` object store of the same NATS). Engines run with one thread (``LLM_ROUTER_ENGINE_THREADS=1``) in
both. ``--output FILE`` writes the section between ``<!-- multimodal:begin -->`` and
``<!-- multimodal:end -->`` of FILE (see ``bench/overhead.py``'s ``write_section``).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))
sys.path.insert(2, str(ROOT / "tests"))

from llm_router.processes import Process, cli  # noqa: E402

os.environ.setdefault("LLM_ROUTER_ENGINE_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LLM_ROUTER_WHISPER_BEAM_SIZE", "1")  # greedy: random weights otherwise beam to the limit

BEGIN, END = "<!-- multimodal:begin -->", "<!-- multimodal:end -->"
SIZE = 64
AUDIO_SECONDS = 2.0
BIG_AUDIO_SECONDS = 70.0  # 2.2 MB of WAV: the upload goes through the object store
CLAIM_CHECK_MB = (2, 10, 25)  # payload sizes for the claim-check round trip alone


def build_models(folder: Path) -> dict[str, Path]:
    from tiny_models import build_tiny_piper_voice, build_tiny_sd, build_tiny_whisper

    return {
        "sd": build_tiny_sd(folder / "bench-sd"),
        "whisper": build_tiny_whisper(folder / "bench-whisper"),
        "voice": build_tiny_piper_voice(folder / "bench-voice", sample_rate=22050),
    }


def load_engines(models: dict[str, Path]) -> dict[str, object]:
    from events.messages import ModelRecord, ModelSource
    from nodes.runtimes import DiffusersRuntime, FasterWhisperRuntime, PiperRuntime

    def record(name: str, runtime: str, path: Path) -> ModelRecord:
        return ModelRecord(
            name=name, format=runtime, runtime=runtime, capabilities=[], source=ModelSource(kind="path", path=str(path))
        )

    return {
        "sd": DiffusersRuntime().load(record("sd", "diffusers", models["sd"]), str(models["sd"])),
        "whisper": FasterWhisperRuntime().load(
            record("w", "faster_whisper", models["whisper"]), str(models["whisper"])
        ),
        "voice": PiperRuntime().load(record("v", "piper", models["voice"]), str(models["voice"])),
    }


class Up:
    """``llm-router up`` with the three models, in its own process."""

    def __init__(self, models: dict[str, Path], data_dir: Path) -> None:
        args = ["--log-level", "warning", "up", "--no-auth", "--port", "0", "--nats-port", "0"]
        args += ["--data-dir", str(data_dir)]
        for path in models.values():
            args += ["--model", str(path)]
        self.proc = Process(cli(*args))
        self.url: str | None = None
        self.nats_url: str | None = None
        self.nats_creds = data_dir / "nats-auth" / "operator.creds"  # `up`'s NATS admits credentials only

    def wait(self, timeout: float = 120.0) -> str:
        match = self.proc.wait_for(r"LLM Router ready: (http://\S+)/v1\s+\(NATS (\S+)\)", timeout)
        self.url, self.nats_url = match.group(1), match.group(2)
        self.proc.wait_for(r"^Serving:", timeout)
        return self.url

    def stop(self) -> None:
        self.proc.stop(timeout=30)


def endpoints(engines: dict, names: dict[str, str], url: str) -> dict[str, tuple[Callable, Callable]]:
    """Per endpoint: (direct call, gateway call), both on the same input."""
    import httpx
    from tiny_models import make_mask_png, make_png, make_wav

    from events import codec
    from nodes.runtimes.transcript_formats import render

    http = httpx.Client(base_url=url, timeout=120)
    sd, whisper, voice = engines["sd"], engines["whisper"], engines["voice"]
    image, mask = make_png(SIZE, SIZE), make_mask_png(SIZE, SIZE, (16, 16, 48, 48))
    wav = make_wav(seconds=AUDIO_SECONDS)
    big_wav = make_wav(seconds=BIG_AUDIO_SECONDS)
    text = "Hello there. This is a short sentence."

    def ok(response: httpx.Response) -> None:
        if response.status_code != 200:
            raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text[:300]}")

    def gen_gateway(size: int) -> Callable:
        def call() -> None:
            ok(
                http.post(
                    "/v1/images/generations",
                    json={
                        "model": names["sd"],
                        "prompt": "a red square",
                        "size": f"{size}x{size}",
                        "response_format": "b64_json",
                        "seed": 1,
                    },
                )
            )

        return call

    def edit_gateway() -> None:
        ok(
            http.post(
                "/v1/images/edits",
                data={"model": names["sd"], "prompt": "a cat", "response_format": "b64_json", "seed": "1"},
                files={"image": ("in.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")},
            )
        )

    def variation_gateway() -> None:
        ok(
            http.post(
                "/v1/images/variations",
                data={"model": names["sd"], "response_format": "b64_json", "seed": "1"},
                files={"image": ("in.png", image, "image/png")},
            )
        )

    def stt_gateway(path: str, audio: bytes) -> Callable:
        def call() -> None:
            ok(http.post(path, data={"model": names["whisper"]}, files={"file": ("a.wav", audio, "audio/wav")}))

        return call

    def stt_direct(task: str, audio: bytes) -> Callable:
        def call() -> None:
            codec.encode(render(whisper.transcribe(audio, task=task), "json"))

        return call

    def speech_direct() -> None:
        pcm, rate = voice.speak(text)
        voice.encode(pcm, rate, "wav")

    def speech_gateway() -> None:
        ok(
            http.post(
                "/v1/audio/speech",
                json={"model": names["voice"], "input": text, "voice": "alloy", "response_format": "wav"},
            )
        )

    return {
        "POST /v1/images/generations": (
            lambda: sd.generate("a red square", width=SIZE, height=SIZE, seed=1),
            gen_gateway(SIZE),
        ),
        "POST /v1/images/edits": (lambda: sd.edit(image, mask, "a cat", seed=1), edit_gateway),
        "POST /v1/images/variations": (lambda: sd.variation(image, seed=1), variation_gateway),
        "POST /v1/audio/transcriptions": (stt_direct("transcribe", wav), stt_gateway("/v1/audio/transcriptions", wav)),
        f"POST /v1/audio/transcriptions {BIG_AUDIO_SECONDS:g} s, 2.2 MB (upload via object store)": (
            stt_direct("transcribe", big_wav),
            stt_gateway("/v1/audio/transcriptions", big_wav),
        ),
        "POST /v1/audio/translations": (stt_direct("translate", wav), stt_gateway("/v1/audio/translations", wav)),
        "POST /v1/audio/speech": (speech_direct, speech_gateway),
    }


def timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def measure(calls: dict[str, tuple[Callable, Callable]], rounds: int, warmup: int) -> list[tuple[str, float, float]]:
    rows = []
    for name, (direct, gateway) in calls.items():
        for _ in range(warmup):
            direct()
            gateway()
        d, g = [], []
        for i in range(rounds):  # alternate which goes first, so neither always runs on a warmer cache
            if i % 2:
                d.append(timed(direct))
                g.append(timed(gateway))
            else:
                g.append(timed(gateway))
                d.append(timed(direct))
        rows.append((name, statistics.median(d), statistics.median(g)))
        print(f"{name}: direct {rows[-1][1]:.1f} ms, gateway {rows[-1][2]:.1f} ms", file=sys.stderr, flush=True)
    return rows


async def claim_checks(nats_url: str, creds: Path, rounds: int) -> list[tuple[int, float, float]]:
    """Per size: median ms to store a payload (``payloads.attach``) and to read + delete it
    (``payloads.load(consume=True)``), on the same NATS as the stack: what a large upload or
    image answer adds, besides HTTP."""
    import nats

    from broker import payloads

    nc = await nats.connect(nats_url, user_credentials=str(creds))
    js = nc.jetstream()
    out = []
    try:
        for mb in CLAIM_CHECK_MB:
            data = os.urandom(mb * 1024 * 1024)
            put, get = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                attachment = await payloads.attach(js, data, content_type="application/octet-stream")
                t1 = time.perf_counter()
                back = await payloads.load(js, attachment, consume=True)
                t2 = time.perf_counter()
                assert back == data and attachment.object is not None
                put.append((t1 - t0) * 1000)
                get.append((t2 - t1) * 1000)
            out.append((mb, statistics.median(put), statistics.median(get)))
            print(
                f"claim check {mb} MB: put {out[-1][1]:.0f} ms, read+delete {out[-1][2]:.0f} ms",
                file=sys.stderr,
                flush=True,
            )
    finally:
        await nc.close()
    return out


def render_table(
    rows: list[tuple[str, float, float]], rounds: int, command: str, checks: list[tuple[int, float, float]]
) -> str:
    from overhead import machine

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "### Images and audio: the gateway path vs the engine called directly",
        "",
        f"Gateway path vs the engine called directly, tiny models, median of {rounds} alternating rounds "
        f"(`{command}`; {when}, {machine()}). Images {SIZE}x{SIZE}, {AUDIO_SECONDS:g} s of 16 kHz WAV, "
        "one engine thread; gateway = `llm-router up` (NATS, registry, gateway, node in one process).",
        "",
        "| endpoint | direct (ms) | via gateway (ms) | added (ms) | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, direct, gateway in rows:
        lines.append(f"| `{name}` | {direct:.1f} | {gateway:.1f} | {gateway - direct:+.1f} | {gateway / direct:.2f}x |")
    lines += [
        "",
        "Speech-to-text rows vary with the model, not the router: a random-weight Whisper fails the "
        "decoding checks and falls back to sampling at rising temperatures, so its output length (and time) "
        "changes from call to call, and differences of tens of ms either way are noise.",
        "",
        "The claim check alone (`broker/payloads.py` on the same NATS, median of "
        f"{min(rounds, 5)} rounds): what a payload over the 384 KB inline budget costs on top of HTTP.",
        "",
        "| payload | store (ms) | read + delete (ms) | MB/s both ways |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for mb, put, get in checks:
        lines.append(f"| {mb} MB | {put:.0f} | {get:.0f} | {mb * 1000 / (put + get):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from overhead import bench_options

    args = bench_options(__doc__, rounds=15, warmup=2)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-multimodal-") as tmp:
        folder = Path(tmp)
        models = build_models(folder / "models")
        up = Up(models, folder / "up")
        try:
            url = up.wait()
            engines = load_engines(models)
            # The names `up` registers: a folder's name, a file's stem.
            names = {"sd": models["sd"].name, "whisper": models["whisper"].name, "voice": models["voice"].stem}
            rows = measure(endpoints(engines, names, url), args.rounds, args.warmup)
            checks = asyncio.run(claim_checks(up.nats_url, up.nats_creds, min(args.rounds, 5)))
        finally:
            up.stop()
    command = "python bench/multimodal.py" + (f" --rounds {args.rounds}" if args.rounds != 15 else "")
    text = render_table(rows, args.rounds, command, checks)
    from overhead import publish

    return publish(text, args.output, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
