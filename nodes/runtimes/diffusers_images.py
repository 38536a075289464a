"""diffusers on Stable Diffusion pipeline folders: image generation, edits (inpainting), variations.

One text-to-image pipeline is loaded; the image-to-image and inpainting pipelines are built
from it with ``from_pipe``, which shares every module, so the three cost one model's memory.
A lock serialises calls: the pipelines share one scheduler, whose timesteps each call resets;
so the engine has one slot whatever ``--parallel`` asks (a second pipeline would double the
model's memory).

Per-model settings come from the model record's labels, then environment variables:

- ``steps`` / ``LLM_ROUTER_IMAGE_STEPS``: denoising steps when a request names none (default 4,
  right for the distilled "turbo" models in the catalog; use 20-30 for full SD models);
- ``guidance_scale`` / ``LLM_ROUTER_IMAGE_GUIDANCE``: classifier-free guidance (default 0.0, as
  turbo models want; 7.5 for full SD models). At 1.0 or below diffusers skips the unconditional
  pass, which halves the cost but also ignores ``negative_prompt``;
- ``LLM_ROUTER_ENGINE_THREADS``: torch CPU threads (0 = torch's default).
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path
from typing import Any

from events import subjects
from events.messages import ModelRecord
from formats.artifacts import artifact_size

from . import cuda
from .base import EngineError
from .common import PackageRuntime, setting, single_slot

NAME = "diffusers"
CAPABILITIES = [subjects.IMAGE]

MIN_SIDE = 64
MAX_SIDE = 2048
SIDE_MULTIPLE = 8
MAX_IMAGES = 10
MAX_STEPS = 150
DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 0.0
VARIATION_STRENGTH = 0.6  # how far a variation departs from its source image
EDIT_STRENGTH = 0.8  # whole-image edit (an opaque image and no mask): img2img at this strength


def _number(labels: dict[str, str], label: str, env: str, default: float) -> float:
    raw = setting(labels, label, env)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"model setting {label} (label or {env}) must be a number, not {raw!r}") from None


class DiffusersEngine:
    """Blocking; the node agent calls it from a worker thread."""

    def __init__(
        self,
        path: str,
        *,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        threads: int = 0,
        device: str | None = None,
    ) -> None:
        import torch
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

        if threads > 0:
            torch.set_num_threads(threads)
        self._torch = torch
        if not Path(path).is_dir():  # else diffusers would take it for a hub repository id
            raise RuntimeError(f"no diffusers pipeline folder at {path}")
        self.path = path
        self.capabilities = list(CAPABILITIES)
        self.artifact_bytes = artifact_size(Path(path))
        self.slots = 1  # see the module docstring: one shared scheduler
        self.default_steps = steps
        self.guidance_scale = guidance_scale
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Half precision on GPUs; on CPU the float32 default (passing no dtype also avoids the
        # torch_dtype -> dtype rename between diffusers versions).
        extra = {"torch_dtype": torch.float16} if self.device.startswith("cuda") else {}
        try:
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **extra)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"diffusers could not load the pipeline in {path}: {exc}") from exc
        pipe = pipe.to(self.device)
        self._txt2img = pipe
        try:
            self._img2img = AutoPipelineForImage2Image.from_pipe(pipe)
            self._inpaint = AutoPipelineForInpainting.from_pipe(pipe)
        except ValueError as exc:
            raise RuntimeError(
                f"{type(pipe).__name__} in {path} has no image-to-image/inpainting variant: {exc}"
            ) from exc
        for p in (self._txt2img, self._img2img, self._inpaint):
            p.set_progress_bar_config(disable=True)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ requests

    def generate(
        self,
        prompt: str,
        n: int = 1,
        width: int = 512,
        height: int = 512,
        seed: int | None = None,
        steps: int | None = None,
        negative_prompt: str | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> list[bytes]:
        """Text to ``n`` PNG images of ``width`` x ``height``."""
        prompt = _check_prompt(prompt)
        _check_n(n)
        _check_size(width, height)
        steps = self._steps(steps)
        images = self._run(
            self._txt2img,
            cancelled,
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            width=width,
            height=height,
            num_inference_steps=steps,
            num_images_per_prompt=n,
            generator=self._generator(seed),
        )
        return [_png(img) for img in images]

    def edit(
        self,
        image: bytes,
        mask: bytes | None,
        prompt: str,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> list[bytes]:
        """Repaint the masked area of ``image`` following ``prompt`` (OpenAI's images/edits).

        The mask's fully transparent pixels mark what to repaint (a mask without alpha: white
        marks it, the diffusers convention). Without a mask, the image's own transparent pixels
        are the mask; a fully opaque image with no mask is edited as a whole (image-to-image).
        Output size defaults to the image's size; another size resizes image and mask first.
        """
        from PIL import Image

        prompt = _check_prompt(prompt)
        _check_n(n)
        source = _decode_image(image, "image")
        width, height = _output_size(source, width, height)
        if mask is not None:
            mask_image = _decode_image(mask, "mask")
            if mask_image.size != source.size:
                raise EngineError(
                    f"mask is {mask_image.size[0]}x{mask_image.size[1]} but image is {source.size[0]}x{source.size[1]}; they must match",
                    param="mask",
                )
            repaint = _repaint_area(mask_image)
            if repaint is None:
                raise EngineError("mask marks nothing to edit (no transparent pixels)", param="mask")
        else:
            repaint = _repaint_area(source) if _has_alpha(source) else None
        steps = self._steps(steps)
        rgb = source.convert("RGB").resize((width, height))
        if repaint is None:
            return self._redraw(rgb, prompt, n, EDIT_STRENGTH, steps, seed, cancelled)
        area = repaint.resize((width, height))
        images = self._run(
            self._inpaint,
            cancelled,
            prompt=prompt,
            image=rgb,
            mask_image=area,
            width=width,
            height=height,
            strength=1.0,
            num_inference_steps=steps,
            num_images_per_prompt=n,
            generator=self._generator(seed),
        )
        # The VAE round trip alters every pixel; outside the mask, OpenAI's edits keep the
        # original, so paste it back.
        return [_png(Image.composite(img, rgb, area)) for img in images]

    def variation(
        self,
        image: bytes,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        *,
        cancelled: threading.Event | None = None,
    ) -> list[bytes]:
        """``n`` variations of ``image``: image-to-image with an empty prompt, strength 0.6."""
        _check_n(n)
        source = _decode_image(image, "image")
        width, height = _output_size(source, width, height)
        steps = self._steps(steps)
        rgb = source.convert("RGB").resize((width, height))
        return self._redraw(rgb, "", n, VARIATION_STRENGTH, steps, seed, cancelled)

    def close(self) -> None:
        self._txt2img = self._img2img = self._inpaint = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    # ------------------------------------------------------------ helpers

    def _steps(self, steps: int | None) -> int:
        steps = self.default_steps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
            raise EngineError(f"steps must be an integer from 1 to {MAX_STEPS}, not {steps!r}", param="steps")
        return steps

    def _generator(self, seed: int | None) -> Any:
        if seed is None:
            return None
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise EngineError(f"seed must be a non-negative 64-bit integer, not {seed!r}", param="seed")
        return self._torch.Generator(device=self.device).manual_seed(seed)

    def _redraw(
        self,
        rgb: Any,
        prompt: str,
        n: int,
        strength: float,
        steps: int,
        seed: int | None,
        cancelled: threading.Event | None,
    ) -> list[bytes]:
        """Image-to-image: ``n`` PNGs redrawn from ``rgb`` at ``strength`` (a variation, a whole-image edit)."""
        # One prompt and one image per output: diffusers deprecates duplicating the image.
        images = self._run(
            self._img2img,
            cancelled,
            prompt=[prompt] * n,
            image=[rgb] * n,
            strength=strength,
            num_inference_steps=_steps_for_strength(steps, strength),
            generator=self._generator(seed),
        )
        return [_png(img) for img in images]

    def _run(self, pipe: Any, cancelled: threading.Event | None, **kwargs: Any) -> list[Any]:
        def stop_when_cancelled(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            if cancelled is not None and cancelled.is_set():
                pipeline._interrupt = True  # diffusers skips the remaining steps
            return callback_kwargs

        with self._lock:
            if pipe is None:
                raise EngineError("the model was unloaded", status=503)
            result = pipe(
                guidance_scale=self.guidance_scale,
                callback_on_step_end=stop_when_cancelled,
                output_type="pil",
                **kwargs,
            )
        if cancelled is not None and cancelled.is_set():
            raise EngineError("request cancelled", status=499, code="cancelled")
        return list(result.images)


# ------------------------------------------------------------ validation and image I/O


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise EngineError("prompt must be a non-empty string", param="prompt")
    return prompt


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES:
        raise EngineError(f"n must be an integer from 1 to {MAX_IMAGES}, not {n!r}", param="n")


def _check_size(width: int, height: int) -> None:
    for side in (width, height):
        if not isinstance(side, int) or isinstance(side, bool):
            raise EngineError(f"size must be WIDTHxHEIGHT in whole pixels, not {width!r}x{height!r}", param="size")
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
            raise EngineError(
                f"size {width}x{height} is not supported: each side must be a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}",
                param="size",
            )


def _output_size(source: Any, width: int | None, height: int | None) -> tuple[int, int]:
    """The requested size, or the source image's size rounded down to the size multiple."""
    if width is None and height is None:
        width = source.size[0] // SIDE_MULTIPLE * SIDE_MULTIPLE
        height = source.size[1] // SIDE_MULTIPLE * SIDE_MULTIPLE
    elif width is None or height is None:
        raise EngineError("give both width and height, or neither", param="size")
    _check_size(width, height)
    return width, height


def _steps_for_strength(steps: int, strength: float) -> int:
    """diffusers runs int(steps * strength) steps; at least one must remain."""
    return max(steps, math.ceil(1 / strength))


def _decode_image(data: bytes, param: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise EngineError(f"{param} is empty", param=param)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EngineError(f"{param} is not a readable image ({exc})", param=param) from None
    return image


def _has_alpha(image: Any) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _repaint_area(image: Any) -> Any:
    """An "L" mask, white where to repaint, or None when nothing is marked."""
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        mask = alpha.point(lambda a: 255 if a == 0 else 0)
    else:
        mask = image.convert("L").point(lambda v: 255 if v >= 128 else 0)
    return mask if mask.getbbox() is not None else None


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class DiffusersRuntime(PackageRuntime):
    name = NAME
    capabilities = CAPABILITIES
    packages = [("diffusers", "diffusers"), ("torch", "torch"), ("transformers", "transformers"), ("PIL", "pillow")]

    def runs_on_gpu(self) -> bool:
        """Load picks CUDA (float16) when torch has it; a CUDA build and a visible device say so."""
        return cuda.torch_cuda_version()[1] is not None and cuda.cuda_device_count() > 0

    def load(self, record: ModelRecord, path: str, *, slots: int = 1) -> DiffusersEngine:
        single_slot(NAME, record.name, slots, "the pipelines share one scheduler: calls run one at a time")
        labels = record.labels or {}
        steps = _number(labels, "steps", "LLM_ROUTER_IMAGE_STEPS", DEFAULT_STEPS)
        if steps != int(steps) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"model setting steps must be an integer from 1 to {MAX_STEPS}, not {steps}")
        guidance = _number(labels, "guidance_scale", "LLM_ROUTER_IMAGE_GUIDANCE", DEFAULT_GUIDANCE)
        return DiffusersEngine(
            path, steps=int(steps), guidance_scale=guidance, threads=self.threads, device=self.device
        )
