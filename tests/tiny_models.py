"""Tiny random-weight models for the multimodal engines, built offline in a second or two.

No model hub is reachable from tests or CI, so each builder makes a real artifact of the
format the engine reads (a diffusers pipeline folder, a CTranslate2 Whisper folder, a Piper
voice) with made-up weights. The outputs are noise, but every code path of the real library
runs. Recipes and their pitfalls: shared/offline-runtimes.md sections 2-4.

A tiny llama.cpp vision projector (mmproj GGUF) is built too, for vision chat, and
``model_record`` writes the registry's record of a model file as tests need one.

Heavy imports (torch, transformers, diffusers, ctranslate2) happen inside the builders, so
importing this module costs nothing where the extras are absent.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
import warnings
import wave
from pathlib import Path

from events.messages import ModelRecord, ModelSource

SEED = 0

# Byte-level BPE symbols (GPT-2's bytes_to_unicode): every UTF-8 string tokenizes with them.


def _byte_symbols() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


# --------------------------------------------------------------------------- Stable Diffusion


def build_tiny_sd(directory: Path) -> Path:
    """A StableDiffusionPipeline folder (model_index.json + components, ~7 MB).

    Two VAE blocks give vae_scale_factor 2, so a 64x64 image is 32x32 latents and a step
    costs milliseconds. The 4-channel UNet also serves inpainting (latent blending mode).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    # The sizes the components must agree on, each named once.
    max_tokens = 77  # tokenizer length = text encoder positions
    text_width = 32  # text encoder hidden size = what the UNet cross-attends to
    latents = 4  # VAE latent channels = UNet input and output channels
    side = 64  # image side; the two VAE blocks halve it for the UNet's latents
    blocks, groups = (32, 64), 8  # block widths of UNet and VAE; GroupNorm groups divide them

    symbols = _byte_symbols()
    merges = ["t h", "e r", "a n", "i n"]
    vocab_list = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    with tempfile.TemporaryDirectory() as tmp:
        # Files rather than a dict and a list: transformers 4.x takes only paths.
        tok_dir = Path(tmp)
        (tok_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=max_tokens)

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=max_tokens,
            projection_dim=text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=blocks,
        layers_per_block=1,
        sample_size=side // 2,
        in_channels=latents,
        out_channels=latents,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width,
        norm_num_groups=groups,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=blocks,
        in_channels=3,  # RGB
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latents,
        norm_num_groups=groups,
        sample_size=side,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- Whisper

WHISPER_SPECIALS_BEFORE = ["<|endoftext|>", "<|startoftranscript|>"]
WHISPER_SPECIALS_AFTER = [
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",  # must be last: timestamp tokens start at its id + 1
]


def build_tiny_whisper(directory: Path, *, multilingual: bool = True) -> Path:
    """A CTranslate2 Whisper folder faster-whisper loads offline (~2 MB).

    Multilingual costs little: CTranslate2 calls a model multilingual when its vocabulary holds
    the empty-string token, and faster-whisper counts languages from the ids between
    ``<|startoftranscript|>`` and ``<|translate|>``, so all 100 language tokens go there. The
    converter leaves config.json "lang_ids" empty under transformers 5; it is filled in after.
    """
    import ctranslate2

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_dir = Path(tempfile.mkdtemp(prefix="tiny-whisper-hf-"))  # the transformers model to convert
    try:
        lang_ids = _build_whisper_transformers(hf_dir, multilingual)
        ctranslate2.converters.TransformersConverter(
            str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"]
        ).convert(str(directory), quantization="float32", force=True)
    finally:
        shutil.rmtree(hf_dir)
    if multilingual:
        cfg_path = directory / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["lang_ids"] = lang_ids
        cfg_path.write_text(json.dumps(cfg, indent=1))
    return directory


def _build_whisper_transformers(hf_dir: Path, multilingual: bool) -> list[int]:
    """A random WhisperForConditionalGeneration with its tokenizer; returns the language token ids."""
    import torch
    from faster_whisper.tokenizer import _LANGUAGE_CODES
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(SEED)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    vocab_list = _byte_symbols() + ["".join(m) for m in merges] + ([""] if multilingual else [])
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    languages = [f"<|{code}|>" for code in _LANGUAGE_CODES] if multilingual else []
    bpe.add_special_tokens(WHISPER_SPECIALS_BEFORE + languages + WHISPER_SPECIALS_AFTER)
    # The converter loads the tokenizer with AutoTokenizer; faster-whisper reads tokenizer.json.
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    ).save_pretrained(hf_dir)
    bpe.save(str(hf_dir / "tokenizer.json"))
    sot = bpe.token_to_id("<|startoftranscript|>")
    eot = bpe.token_to_id("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=bpe.get_vocab_size() + 1501,  # + the <|0.00|>..<|30.00|> timestamp tokens
        num_mel_bins=80,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,  # faster-whisper always pads to 30 s = 3000 frames
        max_target_positions=448,
        decoder_start_token_id=sot,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        suppress_tokens=[],
        begin_suppress_tokens=[eot],
    )
    WhisperForConditionalGeneration(config).save_pretrained(hf_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(hf_dir)
    return [bpe.token_to_id(tok) for tok in languages]


# --------------------------------------------------------------------------- Piper voice


def build_tiny_piper_voice(
    directory: Path, *, sample_rate: int = 22050, phoneme_type: str = "text", num_speakers: int = 1
) -> Path:
    """``voice.onnx`` + ``voice.onnx.json`` with Piper's exact ONNX interface; returns the .onnx path.

    The network is a toy (embedding -> linear to one hop of samples per phoneme id -> tanh),
    not VITS, but its inputs/outputs match a real export: "input" [B, T] int64,
    "input_lengths" [B], "scales" [3] (noise, length, noise_w), "sid" [B] when multi-speaker,
    output [B, 1, time]. length_scale stretches the output so speed is observable.
    phoneme_type "text" needs no phonemizer; "espeak" uses piper-tts's bundled espeak-ng.
    """
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    id_map = _phoneme_id_map(phoneme_type)
    num_symbols = max(i for ids in id_map.values() for i in ids) + 1
    hop = 256

    class ToyVoice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(num_symbols, 16)
            self.speaker = torch.nn.Embedding(max(num_speakers, 1), 16)
            self.to_audio = torch.nn.Linear(16, hop)

        def forward(self, input, input_lengths, scales, sid=None):  # Piper's input names
            x = self.embed(input)
            if sid is not None:
                x = x + self.speaker(sid).unsqueeze(1)
            mask = (torch.arange(input.shape[1]).unsqueeze(0) < input_lengths.unsqueeze(1)).unsqueeze(2)
            audio = (torch.tanh(self.to_audio(x)) * mask * scales[0]).reshape(input.shape[0], -1)
            # length_scale stretches time (nearest-sample resampling), as a real duration
            # predictor would; the index arithmetic stays dynamic in the exported graph.
            n_out = torch.floor(audio.shape[1] * scales[1]).to(torch.int64)
            index = torch.floor(torch.arange(n_out) / scales[1]).to(torch.int64).clamp(max=audio.shape[1] - 1)
            return audio[:, index].unsqueeze(1)

    model = ToyVoice().eval()
    ids = torch.tensor([[1, 0, 14, 0, 2]], dtype=torch.int64)
    lengths = torch.tensor([5], dtype=torch.int64)
    scales = torch.tensor([0.667, 1.0, 0.8], dtype=torch.float32)
    inputs: tuple = (ids, lengths, scales)
    names = ["input", "input_lengths", "scales"]
    axes = {"input": {0: "batch", 1: "phonemes"}, "input_lengths": {0: "batch"}, "output": {0: "batch", 2: "time"}}
    if num_speakers > 1:
        inputs += (torch.tensor([0], dtype=torch.int64),)
        names.append("sid")
        axes["sid"] = {0: "batch"}
    onnx_path = directory / "voice.onnx"
    with warnings.catch_warnings():
        # The legacy exporter is deprecated, but it is the one piper's own export uses, and
        # the dynamo exporter needs onnxscript (offline-runtimes.md section 4).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            inputs,
            str(onnx_path),
            dynamo=False,
            opset_version=15,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
        )
    config = {
        "audio": {"sample_rate": sample_rate, "quality": "x_low"},
        "espeak": {"voice": "en-us"},
        "phoneme_type": phoneme_type,
        "num_symbols": num_symbols,
        "num_speakers": num_speakers,
        "speaker_id_map": {f"speaker{i}": i for i in range(num_speakers)} if num_speakers > 1 else {},
        "inference": {"noise_scale": 0.667, "length_scale": 1.0, "noise_w": 0.8},
        "phoneme_id_map": id_map,
        "hop_length": hop,
        "piper_version": "1.0.0",
    }
    Path(str(onnx_path) + ".json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return onnx_path


def _phoneme_id_map(phoneme_type: str) -> dict[str, list[int]]:
    """Piper's standard IPA map for espeak voices; for "text" voices, the characters themselves."""
    if phoneme_type == "espeak":
        from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP  # needs piper-tts, as espeak does

        return {k: list(v) for k, v in DEFAULT_PHONEME_ID_MAP.items()}
    if phoneme_type != "text":
        raise ValueError(f"phoneme_type must be 'text' or 'espeak', not {phoneme_type!r}")
    symbols = ["_", "^", "$", " "] + [chr(c) for c in range(ord("!"), ord("~") + 1) if chr(c) not in "_^$"]
    return {s: [i] for i, s in enumerate(symbols)}


# --------------------------------------------------------------------------- vision projector


def build_tiny_mmproj(path: Path, *, text_embedding: int = 64) -> Path:
    """A LLaVA-1.5-style multimodal projector GGUF (llama.cpp "clip" arch, "mlp" projector, ~80 KB).

    A one-block ViT on 32x32 images in 8x8 patches (16 image tokens), then the two-layer MLP
    projector into the text model's embedding size (``text_embedding``: 64 for the tiny GGUF
    of ``nodes.demo_model``); libmtmd refuses a projector whose output size differs.
    """
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    width, ffn, patch, image = 32, 64, 8, 32
    positions = (image // patch) ** 2 + 1  # + the class embedding
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", image)
    writer.add_uint32("clip.vision.patch_size", patch)
    writer.add_uint32("clip.vision.embedding_length", width)
    writer.add_uint32("clip.vision.feed_forward_length", ffn)
    writer.add_uint32("clip.vision.projection_dim", text_embedding)
    writer.add_uint32("clip.vision.block_count", 1)
    writer.add_uint32("clip.vision.attention.head_count", 4)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_file_type(0)  # all float32

    def random(name: str, *shape: int) -> None:  # numpy shape = ggml ne reversed
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def norm(name: str, size: int) -> None:
        writer.add_tensor(f"{name}.weight", np.ones(size, dtype=np.float32))
        writer.add_tensor(f"{name}.bias", np.zeros(size, dtype=np.float32))

    def linear(name: str, out: int, inp: int) -> None:
        random(f"{name}.weight", out, inp)
        writer.add_tensor(f"{name}.bias", np.zeros(out, dtype=np.float32))

    random("v.patch_embd.weight", width, 3, patch, patch)
    random("v.class_embd", width)
    random("v.position_embd.weight", positions, width)
    norm("v.pre_ln", width)
    for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
        linear(f"v.blk.0.{part}", width, width)
    norm("v.blk.0.ln1", width)
    norm("v.blk.0.ln2", width)
    linear("v.blk.0.ffn_up", ffn, width)
    linear("v.blk.0.ffn_down", width, ffn)
    linear("mm.0", text_embedding, width)
    linear("mm.2", text_embedding, text_embedding)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------- records


def model_record(
    name: str,
    path: str | Path,
    *,
    format: str = "gguf",
    runtime: str = "llama_cpp",
    capabilities: tuple[str, ...] = ("chat",),
    kind: str = "path",
    **fields,
) -> ModelRecord:
    """The registry's record of the model at ``path`` (a llama.cpp chat GGUF unless told otherwise),
    for tests that hand a record to a runtime, the node or the codec; ``fields`` are its other
    fields (``labels=...``)."""
    source = ModelSource(kind=kind, path=str(path))
    return ModelRecord(
        name=name, format=format, runtime=runtime, capabilities=list(capabilities), source=source, **fields
    )


# --------------------------------------------------------------------------- test inputs


def make_wav(
    path: Path | None = None, *, seconds: float = 2.0, sample_rate: int = 16000, frequency: float = 440.0
) -> bytes:
    """A mono 16-bit WAV: a tone with a slow amplitude wobble (not silence, so decoding runs).

    Returns the bytes, and writes them to ``path`` when given.
    """
    import numpy as np

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    signal = 0.3 * np.sin(2 * math.pi * frequency * t) * (0.6 + 0.4 * np.sin(2 * math.pi * 3 * t))
    pcm = (signal * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def make_png(
    width: int = 64, height: int = 64, *, transparent_box: tuple[int, int, int, int] | None = None, mode: str = "RGB"
) -> bytes:
    """A PNG with a colour gradient; ``transparent_box`` (x0, y0, x1, y1) makes that area alpha 0."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 128)], axis=-1)
    image = Image.fromarray(rgb.astype("uint8"), "RGB")
    if transparent_box is not None or mode == "RGBA":
        image = image.convert("RGBA")
        if transparent_box is not None:
            alpha = Image.new("L", (width, height), 255)
            alpha.paste(0, transparent_box)
            image.putalpha(alpha)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_mask_png(width: int, height: int, box: tuple[int, int, int, int]) -> bytes:
    """An OpenAI-style mask: fully opaque, with the area to repaint (``box``) transparent."""
    from PIL import Image

    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()
