"""Images for vision-language models: a row's images -> the token ids and tensors a model takes.

A multimodal row is a Eurus-2 row plus an `images` list (verl's geo3k layout) and one `<image>`
marker in the prompt's text per image, in order. An image is PNG/JPEG bytes ({"bytes": ...,
"path": ...} as parquet stores it, or raw bytes), a file path (a relative one is relative to its
data file), or an RGB array [H, W, 3] uint8 (the built-in image task renders its own).

`ImageInputs.load(model_path)` (None for a text-only model) knows the model's family:
- LLaVA: each image is one image token repeated once per patch feature; positions are the
  text's (cumsum of the attention mask, as every other model here);
- Qwen2-VL / Qwen2.5-VL: `<|vision_start|>` + one `<|image_pad|>` per merged patch +
  `<|vision_end|>`; positions are 3D (M-RoPE) and the model builds them itself from
  `mm_token_type_ids` and `image_grid_thw`: given 2D position ids it silently copies them to
  all three rows, and its scores then disagree with its own generation.
The HF engine and the trainer take the expanded ids; vLLM expands placeholders itself and gets
one per image (`collapse`; pre-expanded ids give garbage rollouts, TRL issue 6294).
"""
import io
import os
import shutil

import numpy as np
import torch

MARKER = "<image>"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
FAMILIES = {"llava": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl"}


def is_multimodal(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def model_class(config):
    """The transformers Auto class that loads a model of this config."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    return AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM


def decode(image, folder: str = "") -> np.ndarray:
    """One image of a row -> RGB uint8 [H, W, 3]. Raises ValueError saying why it cannot."""
    if isinstance(image, np.ndarray):
        array = image
    else:
        from PIL import Image
        if isinstance(image, dict):  # parquet's image struct: the bytes, else the path
            if image.get("bytes") is not None and not isinstance(image["bytes"], bytes):
                raise ValueError(f"'bytes' must be image bytes, got "
                                 f"{type(image['bytes']).__name__}")
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str):
            path = image if os.path.isabs(image) else os.path.join(folder, image)
            if not os.path.isfile(path):
                raise ValueError(f"no such image file: {path}")
            with open(path, "rb") as f:
                image = f.read()
        if not isinstance(image, (bytes, bytearray)):
            raise ValueError(f"must be image bytes, a path or an array, got "
                             f"{type(image).__name__}")
        try:
            array = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, ...)
            raise ValueError(f"does not decode as an image ({e})") from None
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"must be RGB uint8 [H, W, 3], got {array.dtype} {list(array.shape)}")
    return array


def png_base64(image: np.ndarray) -> str:
    """An RGB array as a base64 PNG (samples.jsonl, for bench/render_samples.py)."""
    import base64

    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def family(config) -> str:
    kind = FAMILIES.get(config.model_type)
    if kind is None:
        raise ValueError(f"{config.model_type}: vision-language models supported are LLaVA and "
                         f"Qwen2-VL / Qwen2.5-VL")
    return kind


def forward_inputs(config, input_ids, attention_mask, pixels=None):
    """The keyword arguments of a (left-padded) forward or generate() with the images' tensors
    (`pixels`, from ImageInputs.pixels and `collate`), positions as the family needs them."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **(pixels or {})}
    if is_multimodal(config) and family(config) == "qwen2_vl":
        # 3D positions, built by the model from where the image tokens are
        inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).long()
    else:  # left padding: positions count real tokens only (else every padded prompt shifts)
        inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


def collate(pixels: list) -> dict | None:
    """Per-row tensors (each a dict from ImageInputs.pixels, or None for a row without images)
    -> one dict, rows' images concatenated in row order (how both families read them)."""
    rows = [p for p in pixels if p]
    if not rows:
        return None
    return {key: torch.cat([p[key] for p in rows]) for key in rows[0]}


def select(pixels: list, idx) -> dict | None:
    """collate() of the rows `idx` (a list or tensor of indices) of per-row pixel dicts."""
    return collate([pixels[i] for i in (idx.tolist() if torch.is_tensor(idx) else idx)])


class ImageInputs:
    """A vision-language model's image processor and placeholder tokens (see the module's
    docstring). load() returns None for a text-only model."""

    def __init__(self, config, image_processor, tokenizer, source=None):
        self.family, self.image_processor = family(config), image_processor
        self.source = source  # the model folder it came from: its processor files, for save()
        self.image_token_id = config.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.family == "qwen2_vl":
            start = tokenizer.convert_ids_to_tokens(config.vision_start_token_id)
            end = tokenizer.convert_ids_to_tokens(config.vision_end_token_id)
            self.placeholder = start + self.image_token + end
            self.merge = image_processor.merge_size ** 2
        else:  # LLaVA: patches, less the CLS feature that the default strategy drops
            vision = config.vision_config
            patches = (vision.image_size // vision.patch_size) ** 2
            self.placeholder = self.image_token
            self.llava_tokens = patches + (config.vision_feature_select_strategy == "full")

    @classmethod
    def load(cls, model_path, tokenizer):
        from transformers import AutoConfig, AutoImageProcessor
        config = AutoConfig.from_pretrained(model_path)
        if not is_multimodal(config):
            return None
        return cls(config, AutoImageProcessor.from_pretrained(model_path), tokenizer, model_path)

    def save(self, path):
        """The processor beside a checkpoint: the source folder's files as they were (a LLaVA's
        processor_config.json holds what vLLM needs to expand images, e.g. patch_size), else the
        image processor alone."""
        copied = [name for name in PROCESSOR_FILES if self.source
                  and os.path.isfile(os.path.join(self.source, name))]
        for name in copied:
            shutil.copy(os.path.join(self.source, name), os.path.join(path, name))
        if not copied:
            self.image_processor.save_pretrained(path)

    def pixels(self, images) -> dict:
        """RGB arrays -> {"pixel_values": ...} (Qwen2-VL: and "image_grid_thw" [n, 3])."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        keys = ("pixel_values", "image_grid_thw") if self.family == "qwen2_vl" else \
            ("pixel_values",)
        return {key: out[key] for key in keys}

    def each_pixels(self, image_lists) -> list:
        """pixels() of each list of images (None where a list is empty or None), each distinct
        list processed once: a group's K prompts share their row's list."""
        done = {}
        for images in image_lists:
            if images and id(images) not in done:
                done[id(images)] = self.pixels(images)
        return [done[id(images)] if images else None for images in image_lists]

    def tokens_per_image(self, images) -> list[int]:
        """Image tokens each image takes: LLaVA's are fixed by its config; Qwen2-VL's follow each
        image's size (its merged patch grid, from the image processor)."""
        if self.family == "qwen2_vl":
            return (self.pixels(images)["image_grid_thw"].prod(-1) // self.merge).tolist()
        return [self.llava_tokens] * len(images)

    def token_ids(self, tokenizer, text: str, images) -> list[int]:
        """Prompt text with one MARKER per image -> token ids, each image's placeholder expanded
        to as many image tokens as the model gives it features."""
        if text.count(MARKER) != len(images):
            raise ValueError(f"{text.count(MARKER)} {MARKER} markers for {len(images)} images")
        ids = tokenizer(text.replace(MARKER, self.placeholder),
                        add_special_tokens=False)["input_ids"]
        counts = iter(self.tokens_per_image(images))
        out = []
        for token in ids:
            out += [token] * (next(counts) if token == self.image_token_id else 1)
        return out

    def collapse(self, ids: list[int]) -> list[int]:
        """Expanded ids -> one placeholder token per image (what vLLM takes). A LLaVA run of
        image tokens may hold several images (no text between them): one token per image."""
        out, run = [], 0
        for token in ids + [None]:
            if token == self.image_token_id:
                run += 1
                continue
            if run:
                out += [self.image_token_id] * (1 if self.family == "qwen2_vl" else
                                                max(1, run // self.llava_tokens))
                run = 0
            if token is not None:
                out.append(token)
        return out
