"""Hugging Face, through ``huggingface_hub``: the GGUF catalog (paged, cached) and repo listings.

``HF_ENDPOINT`` and ``HF_TOKEN`` are read by huggingface_hub itself, so a mirror or a local fake
works unchanged. The client is synchronous; every call runs in a worker thread and the event
loop waits at most ``timeout`` seconds for it. A page that Hugging Face fails to give is served
from the last fetch, marked ``stale``; with nothing cached the caller gets :class:`HfUnavailable`.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
import structlog
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from events.messages import GgufVariant, HfInfo, HfModel, HfPage, HfQuery

log = structlog.get_logger("registry.hf")

# Quantisation names as GGUF publishers write them: Q4_K_M, IQ3_XXS, Q4_0_4_4, Q8_0, F16, BF16.
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d+(?:_[A-Za-z0-9]+)*|BF16|FP16|FP32|F16|F32)(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<parts>\d{5})\.gguf$")
PREFERRED_QUANT = "Q4_K_M"
INFO_RETRY_S = 60.0  # after a failed lookup of downloads/likes, wait this long before the next


class HfUnavailable(RuntimeError):
    """Hugging Face could not be reached (or timed out) and nothing usable is cached."""


class HfNotFound(LookupError):
    """The repository or revision does not exist (or is private without a token)."""


def parse_quantization(filename: str) -> str | None:
    stem = filename.rsplit("/", 1)[-1].removesuffix(".gguf")
    stem = _SPLIT.sub(r"\g<base>", stem + ".gguf") if _SPLIT.match(stem + ".gguf") else stem
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else None


@dataclass(frozen=True)
class RepoFile:
    name: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class RepoListing:
    repo: str
    revision: str | None  # the commit, when the Hub says it
    files: dict[str, RepoFile]
    pipeline_tag: str | None
    tags: list[str]
    last_modified: str | None

    def gguf_files(self) -> list[str]:
        return sorted(name for name in self.files if name.endswith(".gguf") and not is_projector(name))

    def has_safetensors(self) -> bool:
        return any(name.endswith((".safetensors", ".safetensors.index.json")) for name in self.files)


def is_projector(name: str) -> bool:
    """A vision projector (mmproj) is a companion file, not a model variant."""
    return "mmproj" in name.rsplit("/", 1)[-1].lower()


def split_parts(listing: RepoListing, filename: str) -> list[str]:
    """All files of a split GGUF given its first part (or just ``filename``)."""
    match = _SPLIT.match(filename)
    if not match:
        return [filename]
    base, parts = match["base"], int(match["parts"])
    return [f"{base}-{i:05d}-of-{parts:05d}.gguf" for i in range(1, parts + 1)]


def gguf_variants(listing: RepoListing, endpoint: str) -> list[GgufVariant]:
    variants = []
    for name in listing.gguf_files():
        match = _SPLIT.match(name)
        if match and int(match["part"]) != 1:
            continue  # counted with its first part
        parts = [p for p in split_parts(listing, name) if p in listing.files]
        variants.append(
            GgufVariant(
                filename=name,
                quantization=parse_quantization(name),
                size_bytes=sum(listing.files[p].size for p in parts),
                last_modified=listing.last_modified,
                url=hf_hub_url(listing.repo, name, revision=listing.revision, endpoint=endpoint),
                parts=len(parts),
            )
        )
    return variants


def parse_reference(text: str) -> tuple[str, str | None, str | None]:
    """``org/repo``, ``org/repo:QUANT`` or a Hub URL → (repo, revision, filename or ``:QUANT``).

    URLs may be a repo page, ``.../resolve/<rev>/<file>``, ``.../blob/<rev>/<file>`` or
    ``.../tree/<rev>``, on huggingface.co, hf.co or whatever host HF_ENDPOINT names.
    """
    text = text.strip()
    if "://" not in text and text.startswith(("huggingface.co/", "hf.co/")):
        text = "https://" + text
    if "://" in text:
        parts = [p for p in urlsplit(text).path.split("/") if p]
        if parts and parts[0] in ("datasets", "spaces"):
            raise ValueError(f"{text!r} is a Hugging Face {parts[0][:-1]}, not a model repository")
        if len(parts) < 2:
            raise ValueError(f"{text!r} does not name a repository (expected https://huggingface.co/ORG/REPO)")
        repo = f"{parts[0]}/{parts[1]}"
        if len(parts) >= 4 and parts[2] in ("resolve", "blob", "tree"):
            filename = "/".join(parts[4:]) or None
            return repo, parts[3], filename
        return repo, None, None
    repo, _, quant = text.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{text!r} is not a repository id (expected ORG/REPO, ORG/REPO:QUANT or a Hub URL)")
    return repo, None, (":" + quant if quant else None)


class HuggingFace:
    def __init__(self, *, cache_ttl: float = 600.0, timeout: float = 5.0, endpoint: str | None = None) -> None:
        self.api = HfApi(endpoint=endpoint)  # None: HF_ENDPOINT or huggingface.co
        self.cache_ttl = cache_ttl
        self.timeout = timeout
        self._pages: dict[tuple[str, int, int], HfPage] = {}
        self._page_times: dict[tuple[str, int, int], float] = {}
        self._inflight: dict[Any, asyncio.Task] = {}
        self._info: dict[str, tuple[HfInfo, float]] = {}
        self._info_failed: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hf")

    @property
    def endpoint(self) -> str:
        return self.api.endpoint

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ the GGUF catalog

    async def page(self, query: HfQuery) -> HfPage:
        key = (query.search.strip().lower(), query.page, query.per_page)
        cached = self._pages.get(key)
        if cached is not None and time.monotonic() - self._page_times[key] < self.cache_ttl:
            return cached
        try:
            return await self._single_flight(key, lambda: self._fetch_page(key))
        except (HfUnavailable, HfNotFound) as exc:
            if cached is not None:
                log.warning("serving a stale Hugging Face page", search=key[0], page=key[1], error=str(exc))
                return msgspec.structs.replace(cached, stale=True)
            raise HfUnavailable(f"{exc}. Nothing is cached for this page yet; retry in a minute.") from None

    def _fetch_page(self, key: tuple[str, int, int]) -> HfPage:
        search, page, per_page = key
        wanted = page * per_page
        found = list(self.api.list_models(filter="gguf", search=search or None, sort="downloads", limit=wanted + 1))
        chunk = found[(page - 1) * per_page : wanted]
        listings = list(self._pool.map(lambda info: self._listing(info.id, None), chunk))
        models = [
            HfModel(
                id=info.id,
                downloads=info.downloads,
                likes=info.likes,
                last_modified=listing.last_modified,
                tags=list(info.tags or []),
                variants=gguf_variants(listing, self.endpoint),
            )
            for info, listing in zip(chunk, listings)
        ]
        result = HfPage(
            search=search,
            page=page,
            per_page=per_page,
            has_more=len(found) > wanted,
            models=models,
            fetched_at=time.time(),
        )
        self._pages[key] = result
        self._page_times[key] = time.monotonic()
        return result

    # ------------------------------------------------------------ one repository

    async def repo(self, repo: str, revision: str | None = None) -> RepoListing:
        return await self._single_flight(("repo", repo, revision), lambda: self._listing(repo, revision))

    def _listing(self, repo: str, revision: str | None) -> RepoListing:
        try:
            info = self.api.model_info(repo, revision=revision, files_metadata=True, timeout=self.timeout)
        except RevisionNotFoundError:
            raise HfNotFound(
                f"revision {revision!r} of repository {repo!r} does not exist on {self.endpoint}"
            ) from None
        except GatedRepoError:
            raise HfNotFound(
                f"repository {repo!r} is gated on {self.endpoint}: accept its terms and set HF_TOKEN"
            ) from None
        except RepositoryNotFoundError:
            raise HfNotFound(
                f"repository {repo!r} does not exist on {self.endpoint} (or is private: set HF_TOKEN)"
            ) from None
        files = {
            s.rfilename: RepoFile(s.rfilename, s.size or (s.lfs.size if s.lfs else 0), s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or []
        }
        self._info[repo] = (HfInfo(downloads=info.downloads, likes=info.likes), time.monotonic())
        return RepoListing(
            repo=info.id or repo,
            revision=info.sha,
            files=files,
            pipeline_tag=info.pipeline_tag,
            tags=list(info.tags or []),
            last_modified=info.last_modified.isoformat() if info.last_modified else None,
        )

    async def json_file(self, repo: str, revision: str | None, filename: str) -> Any:
        """A small JSON file of a repository (a config.json), or None when it is not valid JSON:
        what a listing cannot say (an EXL2 model is told from its config, not its file names)."""
        return await self._single_flight(
            ("json", repo, revision, filename), lambda: self._json(repo, revision, filename)
        )

    def _json(self, repo: str, revision: str | None, filename: str) -> Any:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory(prefix="llm-router-hf-") as folder:
            path = self.api.hf_hub_download(
                repo, filename, revision=revision, local_dir=folder, etag_timeout=self.timeout
            )
            try:
                return msgspec.json.decode(Path(path).read_bytes())
            except msgspec.DecodeError:
                return None

    # ------------------------------------------------------------ download counts and likes

    def cached_info(self, repo: str) -> HfInfo | None:
        """Downloads and likes if known; never waits. A missing or old value is refreshed behind."""
        known = self._info.get(repo)
        now = time.monotonic()
        stale = known is None or now - known[1] > self.cache_ttl
        failed_recently = now - self._info_failed.get(repo, -INFO_RETRY_S) < INFO_RETRY_S
        key = ("info", repo)
        if stale and not failed_recently and key not in self._inflight:
            task = asyncio.ensure_future(self._single_flight(key, lambda: self._listing(repo, None)))
            task.add_done_callback(self._note_info_failure(repo))
        return known[0] if known else None

    def _note_info_failure(self, repo: str) -> Callable[[asyncio.Future], None]:
        def done(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is not None:
                self._info_failed[repo] = time.monotonic()  # do not ask again for a while
                log.info("Hugging Face info not refreshed", repo=repo, error=str(task.exception()))

        return done

    # ------------------------------------------------------------ plumbing

    async def _single_flight(self, key: Any, work: Callable[[], Any]) -> Any:
        """Run ``work`` in a thread once per key; callers share it and wait ``timeout`` at most.

        A call that outlives the wait keeps running and fills the cache when it finishes.
        """
        task = self._inflight.get(key)
        if task is None:
            task = _in_daemon_thread(work)
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=self.timeout)
        except (HfNotFound, HfUnavailable):
            raise
        except TimeoutError:
            raise HfUnavailable(f"Hugging Face ({self.endpoint}) did not answer within {self.timeout:g} s") from None
        except Exception as exc:  # network errors, HTTP 5xx, bad JSON: all mean "unreachable now"
            raise HfUnavailable(f"Hugging Face ({self.endpoint}) failed: {type(exc).__name__}: {exc}") from None


def _in_daemon_thread(work: Callable[[], Any]) -> asyncio.Future:
    """Run ``work`` in a daemon thread: huggingface_hub's listing retries a dead endpoint for
    about 23 s, and a worker-pool thread would hold up the process's exit that long."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the event loop has closed: nobody waits for this any more
            return

    threading.Thread(target=run, name="hf", daemon=True).start()
    return future
