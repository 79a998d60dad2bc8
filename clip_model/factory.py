"""Build a CLIP model (and its image preprocessing) from an architecture name and weights."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from . import pretrained as registry
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    assign_state_dict,
    infer_config,
    read_checkpoint,
    same_shapes,
)
from .config import CLIPConfig, PreprocessConfig, TowersConfig
from .model import CLIP

QUICKGELU_SUFFIX = "-quickgelu"
_CONFIG_DIR = Path(__file__).parent / "configs"
_PRECISIONS = {"fp32": torch.float32, "amp": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_URI_RE = re.compile(r"^(https?|s3|package|file)://", re.IGNORECASE)


@lru_cache(maxsize=1)
def _all_configs() -> dict[str, CLIPConfig | TowersConfig]:
    out: dict[str, CLIPConfig | TowersConfig] = {}
    for path in sorted(_CONFIG_DIR.glob("*.json")):
        try:
            d = json.loads(path.read_text())
            out[path.stem] = TowersConfig.from_dict(d) if d.get("type") == "towers" else CLIPConfig.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"bad architecture config {path}: {e}") from e
    return out


def _registered_configs() -> dict[str, CLIPConfig]:
    """The CLIP (causal BPE text tower) architectures."""
    return {k: v for k, v in _all_configs().items() if isinstance(v, CLIPConfig)}


def list_models() -> list[str]:
    """Architecture names accepted by create_model: each config, the ``-quickgelu`` variant of
    each CLIP, and the towers architectures (HF text towers, ResNet + BERT)."""
    names = []
    for name, cfg in _all_configs().items():
        names.append(name)
        if isinstance(cfg, CLIPConfig) and not cfg.quick_gelu:
            names.append(name + QUICKGELU_SUFFIX)
    return sorted(names)


def get_model_config(model_name: str) -> CLIPConfig | TowersConfig | None:
    """The registered architecture for ``model_name`` (``-quickgelu`` honoured), or None."""
    configs = _all_configs()
    if model_name in configs:
        return configs[model_name]
    base_name = model_name.removesuffix(QUICKGELU_SUFFIX)
    if model_name.endswith(QUICKGELU_SUFFIX) and isinstance(configs.get(base_name), CLIPConfig):
        base = configs[base_name]
        return CLIPConfig(base.embed_dim, base.vision, base.text, quick_gelu=True)
    return None


def _tower_name(cfg: TowersConfig) -> str | None:
    for name, registered in _all_configs().items():
        if isinstance(registered, TowersConfig) and registered.to_dict() == cfg.to_dict():
            return name
    return None


def _with_act(cfg: CLIPConfig, quick_gelu: bool) -> CLIPConfig:
    return CLIPConfig(cfg.embed_dim, cfg.vision, cfg.text, quick_gelu=quick_gelu)


def _name_for(cfg: CLIPConfig) -> str | None:
    """The registered name whose config equals ``cfg`` exactly (activation included)."""
    for name, registered in _registered_configs().items():
        if registered == cfg:
            return name
        if not registered.quick_gelu and _with_act(registered, True) == cfg:
            return name + QUICKGELU_SUFFIX
    return None


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _weights_sha256(ckpt: Checkpoint, known: str | None) -> str:
    if known is not None:
        return known.lower()
    if len(ckpt.files) == 1:
        return registry.file_sha256(ckpt.files[0])
    # Sharded HF weights: one digest over the shards' digests, in file-name order.
    import hashlib

    joined = "".join(registry.file_sha256(f) for f in ckpt.files)
    return hashlib.sha256(joined.encode()).hexdigest()


def _local(uri: str | Path) -> Path:
    """A local path for a path or URI (downloads http(s)/s3/package URIs through the registry)."""
    if isinstance(uri, Path) or not _URI_RE.match(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"weights not found: {path}")
        return path
    return Path(registry.fetch(uri))


def _looks_like_weights(s: str) -> bool:
    return bool(_URI_RE.match(s)) or Path(s).expanduser().exists() or "/" in s or s.endswith(
        (".pt", ".pth", ".bin", ".safetensors")
    )


def create_model(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    quick_gelu: bool | None = None,
    text_model: str | Path | None = None,
) -> tuple[CLIP, PreprocessConfig]:
    """Build a CLIP model in eval mode and the PreprocessConfig its weights expect.

    model_name: an architecture from list_models() (open_clip's names, e.g. "ViT-B-32",
        "ViT-B-32-quickgelu", "RN50"), or a weights file / HF folder / URL on its own, whose
        architecture is then read from the weights.
    pretrained: None (random weights), a registered tag (see list_pretrained()), or a local
        path, http(s):// URL or s3:// URI of weights for that architecture.
    device: default "cuda" when available, else "cpu".
    precision: "fp32" (default), "fp16" or "bf16" (weights cast), "amp" (fp32 weights; the
        caller autocasts).
    quick_gelu: force the activation; by default it comes from the name's ``-quickgelu``
        suffix, the registry entry, the HF config, or - for a bare OpenAI-layout state dict
        given as model_name - QuickGELU, which every OpenAI release uses.

    text_model: a folder holding a text tower to use instead of the architecture's own:
        a sentence-transformers model (M-CLIP: multilingual DistilBERT + Dense) beside the
        image tower of ``model_name`` / ``pretrained`` (e.g. "ViT-B-32", "openai"), or for
        an HF-text architecture (e.g. "xlm-roberta-base-ViT-B-32") the folder with its text
        config.json and tokenizer when they are not beside the weights.

    model_name may also be a Chinese-CLIP folder (``ChineseCLIPModel.save_pretrained``), an
    open_clip local-dir whose text tower is an HF model, or a tower checkpoint written by
    clip_model.train; those and the HF-text architectures need ``clipcurate[hf]``.

    Sets ``model.name`` (architecture name) and ``model.weights_sha256`` (None when random).
    Every model returned has ``encode_image``, ``encode_text`` (ids right-padded with
    ``model.tokenizer.pad_id``), ``embed_dim``, ``tokenizer``, ``context_length``,
    ``logit_scale`` and ``preprocess_cfg``.
    """
    precision = precision or "fp32"
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    dev = _resolve_device(device)
    tower = _create_tower(model_name, pretrained, quick_gelu, text_model)
    if tower is not None:
        tower = tower.to(device=dev, dtype=_PRECISIONS[precision]).eval()
        return tower, tower.preprocess_cfg

    cfg = get_model_config(model_name)
    ckpt: Checkpoint | None = None
    known_sha: str | None = None
    preprocess: PreprocessConfig | None = None
    if cfg is not None:
        name = model_name
        if pretrained is not None:
            entry = registry.get_pretrained_entry(model_name, pretrained)
            if entry is not None:
                path = Path(registry.fetch(entry.url, sha256=entry.sha256))
                known_sha, preprocess = entry.sha256, entry.preprocess
                if entry.quick_gelu and not cfg.quick_gelu and quick_gelu is None:
                    # OpenAI's weights only reproduce their results with QuickGELU.
                    cfg, name = _with_act(cfg, True), model_name + QUICKGELU_SUFFIX
            elif _looks_like_weights(pretrained):
                path = _local(pretrained)
            else:
                base = model_name.removesuffix(QUICKGELU_SUFFIX)
                tags = [t for a, t in registry.list_pretrained() if a == base]
                raise ValueError(
                    f"unknown pretrained tag {pretrained!r} for {model_name}; registered tags: "
                    f"{tags or 'none'}; or pass a weights path/URL"
                )
            ckpt = read_checkpoint(path)
            if ckpt.config is not None:
                if not same_shapes(ckpt.config, cfg):
                    raise CheckpointError(
                        f"weights at {pretrained} describe a different architecture "
                        f"than {model_name}"
                    )
                # The file's own config also knows head counts and the activation.
                cfg = ckpt.config
                name = _name_for(cfg) or model_name
            preprocess = preprocess or ckpt.preprocess
    else:
        if not _looks_like_weights(model_name):
            raise ValueError(
                f"unknown model {model_name!r}: not one of list_models() and not a weights path"
            )
        if pretrained is not None:
            raise ValueError("pretrained must be None when model_name is itself a weights path")
        ckpt = read_checkpoint(_local(model_name))
        if ckpt.config is not None:
            cfg = ckpt.config
        else:
            inferred = infer_config(ckpt.state_dict)
            # A registered config with the same shapes also knows the head counts.
            cfg = next(
                (c for c in _registered_configs().values() if same_shapes(c, inferred)), inferred
            )
            cfg = _with_act(cfg, True)
        preprocess = ckpt.preprocess
        name = _name_for(_with_act(cfg, cfg.quick_gelu if quick_gelu is None else quick_gelu))
        name = name or Path(model_name).name
    if quick_gelu is not None:
        cfg = _with_act(cfg, quick_gelu)
        name = _name_for(cfg) or name

    dtype = _PRECISIONS[precision]
    if ckpt is None:
        model = CLIP(cfg)
    else:
        # Built on the meta device and filled by assignment: no time spent on random init.
        with torch.device("meta"):
            model = CLIP(cfg)
        assign_state_dict(model, ckpt.state_dict, name)
    model = model.to(device=dev, dtype=dtype).eval()
    model.name = name
    model.weights_sha256 = None if ckpt is None else _weights_sha256(ckpt, known_sha)
    model.preprocess_cfg = preprocess or PreprocessConfig(image_size=cfg.vision.image_size)
    return model, model.preprocess_cfg


def _create_tower(
    model_name: str, pretrained: str | None, quick_gelu: bool | None, text_model: str | Path | None
):
    """A TowerCLIP when the request names one, else None (a plain CLIP follows)."""
    cfg = get_model_config(model_name)
    text = None if text_model is None else str(text_model)
    if isinstance(cfg, TowersConfig):
        from . import tower_factory

        return tower_factory.by_name(model_name, cfg, pretrained, text, _local)
    if cfg is None and _looks_like_weights(model_name):
        path = Path(model_name).expanduser()
        if not _URI_RE.match(model_name) and path.exists():
            from . import hf_formats, tower_factory

            if (path.is_dir() and hf_formats.folder_kind(path) in
                    ("chinese_clip", "open_clip", "sentence_transformers")) or (
                    path.is_file() and tower_factory.is_tower_file(path)):  # fmt: skip
                if pretrained is not None:
                    raise ValueError("pretrained must be None when model_name is itself a weights path")
                return tower_factory.from_path(path, text, _tower_name)
    if text is not None:
        # M-CLIP: this architecture's image tower, a sentence-transformers text tower.
        from . import tower_factory

        if cfg is None:
            raise ValueError(f"text_model needs an image-tower architecture; {model_name!r} is not one")
        weights, sha, pp = None, None, None
        if pretrained is not None:
            entry = registry.get_pretrained_entry(model_name, pretrained)
            if entry is not None:
                weights = Path(registry.fetch(entry.url, sha256=entry.sha256))
                sha, pp = entry.sha256, entry.preprocess
                if entry.quick_gelu and quick_gelu is None:
                    cfg = _with_act(cfg, True)
            else:
                weights = _local(pretrained)
        if quick_gelu is not None:
            cfg = _with_act(cfg, quick_gelu)
        return tower_factory.mclip_pairing(model_name, cfg, weights, sha, pp, Path(text))
    return None


def create_model_and_transforms(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    quick_gelu: bool | None = None,
    text_model: str | Path | None = None,
) -> tuple[CLIP, Callable]:
    """Like create_model, but returns (model, preprocess): preprocess maps a PIL image to the
    model's float32 input tensor [3, S, S] (see clip_model.transform.image_transform)."""
    from .transform import image_transform

    model, pp = create_model(model_name, pretrained, device, precision, quick_gelu, text_model)
    return model, image_transform(pp)
