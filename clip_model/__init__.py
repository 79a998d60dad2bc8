"""clipcurate's CLIP: OpenAI / open_clip architectures, weight loading, tokenizer, preprocessing.

    model, preprocess = clip_model.create_model_and_transforms("ViT-B-32", pretrained="openai")
    tokens = clip_model.tokenize(["a photo of a cat"])
    with torch.inference_mode():
        image_features = model.encode_image(preprocess(img)[None], normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
"""

from __future__ import annotations

from typing import Any

from .config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from .factory import create_model, create_model_and_transforms, get_model_config, list_models
from .model import CLIP

__all__ = [
    "CLIP",
    "CLIPConfig",
    "PreprocessConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "create_model_and_transforms",
    "get_model_config",
    "image_transform",
    "list_models",
    "list_pretrained",
    "tokenize",
]


def __getattr__(name: str) -> Any:
    # Resolved on first use so that `import clip_model` stays cheap (the tokenizer loads its
    # vocabulary on import) and a model-only user never pays for it.
    if name == "tokenize":
        from .tokenizer import tokenize

        return tokenize
    if name == "image_transform":
        from .transform import image_transform

        return image_transform
    if name == "list_pretrained":
        from .pretrained import list_pretrained

        return list_pretrained
    raise AttributeError(f"module 'clip_model' has no attribute {name!r}")
