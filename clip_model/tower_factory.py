"""Building :class:`clip_model.hf_model.TowerCLIP` models: by architecture name (our configs),
from a folder (Chinese-CLIP, open_clip local-dir), from this project's tower checkpoints, and
as an M-CLIP pairing (a CLIP image tower beside a sentence-transformers text model).
clip_model.factory dispatches here; transformers is imported only on these paths.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from . import hf_formats as hf
from . import pretrained as registry
from .checkpoints import CheckpointError, assign_state_dict, read_checkpoint
from .config import CLIPConfig, HFTextConfig, PreprocessConfig, TowersConfig
from .hf_model import TowerCLIP


def _digest(files: tuple[Path, ...] | list[Path]) -> str:
    if len(files) == 1:
        return registry.file_sha256(files[0])
    joined = "".join(registry.file_sha256(f) for f in files)
    return hashlib.sha256(joined.encode()).hexdigest()


def load_tower_weights(model: TowerCLIP, sd: dict[str, torch.Tensor], name: str) -> None:
    """Assign ``sd`` to a meta-device TowerCLIP, strictly; errors name what does not fit."""
    assign_state_dict(model, sd, name)
    # Buffers transformers creates outside the state dict (position ids) stay on the meta device
    # after assign=True; rebuild them on the CPU.
    _materialise_buffers(model)


def _materialise_buffers(model: torch.nn.Module) -> None:
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name in ("position_ids",):
                    module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
                elif name == "token_type_ids":
                    module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
                else:
                    raise CheckpointError(f"buffer {name} of {type(module).__name__} has no value")


def _build(cfg: TowersConfig, tokenizer, sd: dict[str, torch.Tensor] | None, name: str) -> TowerCLIP:
    if sd is None:
        return TowerCLIP(cfg, tokenizer)
    with torch.device("meta"):
        model = TowerCLIP(cfg, tokenizer)
    load_tower_weights(model, sd, name)
    return model


def _finish(model: TowerCLIP, name: str, sha: str | None, preprocess: PreprocessConfig | None) -> TowerCLIP:
    model.name = name
    model.weights_sha256 = sha
    model.preprocess_cfg = preprocess or PreprocessConfig(image_size=model.image_size)
    return model


def by_name(
    model_name: str, cfg: TowersConfig, pretrained: str | None, text_model: str | None, local
) -> TowerCLIP:
    """A registered towers architecture, random or with weights (registry tag, path, URL)."""
    if pretrained is None:
        if text_model is not None:
            cfg = replace(cfg, text=replace(cfg.text, tokenizer=str(text_model)))
        tokenizer = hf.load_config_tokenizer(cfg)
        return _finish(_build(cfg, tokenizer, None, model_name), model_name, None, None)
    entry = registry.get_pretrained_entry(model_name, pretrained)
    known_sha, preprocess = None, None
    if entry is not None:
        path = Path(registry.fetch(entry.url, sha256=entry.sha256))
        known_sha, preprocess = entry.sha256, entry.preprocess
    else:
        path = local(pretrained)
    meta = _safetensors_meta(path)
    if meta is not None and hf.META_CONFIG in meta:
        # Our own checkpoint states its architecture; the name's config must give the same shapes
        # (checked by the strict load below).
        ckpt = hf.read_tower_safetensors(path, meta)
    elif cfg.family == "open_clip":
        ckpt = hf.read_open_clip_hf(cfg, path, Path(text_model) if text_model else None)
    else:
        tokenizer = hf.load_config_tokenizer(cfg)
        files = [path] if path.is_file() else []
        ckpt = hf.TowerCheckpoint(cfg, hf.load_tensors(files), tokenizer, None, tuple(files))
    model = _build(ckpt.config, ckpt.tokenizer, ckpt.state_dict, model_name)
    sha = known_sha or _digest(ckpt.files)
    return _finish(model, model_name, sha, preprocess or ckpt.preprocess)


def _safetensors_meta(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    from .checkpoints import _looks_like_safetensors

    with open(path, "rb") as f:
        if not _looks_like_safetensors(f.read(16)):
            return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def is_tower_file(path: Path) -> bool:
    """True for a safetensors file whose metadata describes a towers architecture."""
    meta = _safetensors_meta(path)
    if not meta or hf.META_CONFIG not in meta:
        return False
    try:
        return json.loads(meta[hf.META_CONFIG]).get("type") == "towers"
    except json.JSONDecodeError:
        return False


def from_path(path: Path, text_model: str | None, named) -> TowerCLIP:
    """A model given by its files alone: a Chinese-CLIP folder, an open_clip local-dir with an HF
    text tower, or one of this project's tower checkpoints."""
    if path.is_file():
        ckpt = hf.read_tower_safetensors(path, _safetensors_meta(path) or {})
        name = path.stem
    else:
        kind = hf.folder_kind(path)
        if kind == "chinese_clip":
            ckpt, name = hf.read_chinese_clip(path), path.name
        elif kind == "open_clip":
            cfg, name = _open_clip_local_dir(path, named)
            ckpt = hf.read_open_clip_hf(cfg, path, Path(text_model) if text_model else None)
        elif kind == "sentence_transformers":
            raise ValueError(
                f"{path} is a sentence-transformers text model: pair it with an image tower, "
                f"e.g. create_model('ViT-B-32', pretrained='openai', text_model='{path}')"
            )
        else:
            raise CheckpointError(f"{path}: not a Chinese-CLIP, open_clip or tower-model folder")
    model = _build(ckpt.config, ckpt.tokenizer, ckpt.state_dict, name)
    return _finish(model, name, _digest(ckpt.files), ckpt.preprocess)


def _open_clip_local_dir(folder: Path, named) -> tuple[TowersConfig, str]:
    """open_clip's local-dir layout: open_clip_config.json {model_cfg, preprocess_cfg}; the text
    tower's HF config.json and tokenizer sit in the same folder."""
    doc = json.loads((folder / "open_clip_config.json").read_text())
    mc = doc.get("model_cfg") or {}
    tc = dict(mc.get("text_cfg") or {})
    if "hf_model_name" not in tc:
        raise CheckpointError(f"{folder}: open_clip local-dir without an HF text tower; pass its weights file")
    local = folder / "config.json"
    if not local.is_file():
        raise CheckpointError(f"{folder}: needs the text model's config.json (offline: no hub access)")
    hf_config = json.loads(local.read_text())
    vc = mc.get("vision_cfg") or {}
    base = CLIPConfig.from_dict({"embed_dim": mc["embed_dim"], "vision_cfg": vc, "text_cfg": {}})
    cfg = TowersConfig(
        embed_dim=int(mc["embed_dim"]),
        vision=base.vision,
        text=HFTextConfig(
            hf_config=hf_config,
            context_length=int(tc.get("context_length", 77)),
            pooler={"mean_pooler": "mean", "cls_last_hidden_state_pooler": "cls"}.get(
                tc.get("hf_pooler_type", "mean_pooler"), "unsupported"
            ),
            proj=tc.get("hf_proj_type", "mlp"),
            clean="whitespace",
        ),
        quick_gelu=bool(mc.get("quick_gelu", False)),
        family="open_clip",
    )
    return cfg, named(cfg) or folder.name


def mclip_pairing(
    image_name: str, image_cfg: CLIPConfig, image_weights: Path | None, image_sha: str | None,
    image_pp: PreprocessConfig | None, text_folder: Path,
) -> TowerCLIP:  # fmt: skip
    """An image tower of a CLIP checkpoint (its ``visual.*`` and ``logit_scale``) beside a
    sentence-transformers text model (M-CLIP: multilingual DistilBERT + Dense, trained to land
    on that image tower's embeddings)."""
    if image_cfg.vision.is_resnet:
        raise ValueError("an M-CLIP pairing takes a ViT image tower")
    text, text_sd, tokenizer, files, out_dim = hf.read_sentence_transformer(text_folder)
    if out_dim != image_cfg.embed_dim:
        raise ValueError(
            f"{text_folder} embeds to {out_dim} dims, {image_name}'s image tower to {image_cfg.embed_dim}"
        )
    cfg = TowersConfig(
        embed_dim=image_cfg.embed_dim, vision=image_cfg.vision, text=text, vision_proj="builtin",
        quick_gelu=image_cfg.quick_gelu, family="mclip",
    )  # fmt: skip
    name = f"{image_name}+{text_folder.name}"
    if image_weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TowerCLIP(cfg, tokenizer)
        with torch.no_grad():
            model.text.load_state_dict(
                {k[len("text."):]: v.float() for k, v in text_sd.items()}, strict=True
            )
        return _finish(model, name, None, image_pp)
    ckpt = read_checkpoint(image_weights)
    sd = {k: v for k, v in ckpt.state_dict.items() if k.startswith("visual.") or k == "logit_scale"}
    sd.update(text_sd)
    model = _build(cfg, tokenizer, sd, name)
    text_sha = _digest(files)
    sha = hashlib.sha256(((image_sha or _digest(ckpt.files)) + text_sha).encode()).hexdigest()
    return _finish(model, name, sha, image_pp or ckpt.preprocess)
