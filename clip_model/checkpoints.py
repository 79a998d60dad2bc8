"""Reading CLIP weights without executing code from the file.

Formats: OpenAI's released TorchScript archives, plain state dicts saved with ``torch.save``
(OpenAI / open_clip layout, also open_clip training checkpoints), safetensors files, and Hugging
Face transformers CLIP folders (config.json + model.safetensors or pytorch_model.bin). Every
reader returns tensors in our (= OpenAI's = open_clip's) key layout.

Safety: ``torch.load`` is only called with ``weights_only=True``; TorchScript archives are read by
a restricted unpickler that recognises tensors, storages and inert module records and refuses
every other global, so a malicious archive cannot run code. ``torch.jit.load`` is never used.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig


class CheckpointError(ValueError):
    """The file is not CLIP weights we can read, or does not fit the requested architecture."""


@dataclass
class Checkpoint:
    """Weights read from disk.

    state_dict: name -> tensor in OpenAI/open_clip layout (dtype as stored).
    format: "torchscript", "torch", "safetensors" or "hf".
    config: the architecture when the file states it (HF folders), else None.
    preprocess: the image preprocessing the file states (HF preprocessor_config.json), else None.
    files: the weight files read (for hashing).
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    config: CLIPConfig | None = None
    preprocess: PreprocessConfig | None = None
    files: tuple[Path, ...] = ()


# Tensors OpenAI's / open_clip's modules carry that are not weights: the causal mask and the
# integer attributes OpenAI's TorchScript models register.
_NON_WEIGHT_KEYS = re.compile(
    r"(^|\.)attn_mask$|^input_resolution$|^context_length$|^vocab_size$|position_ids$"
)


def assign_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
    """Load ``sd`` into ``model`` strictly, by assignment (a meta-device model gets the file's
    tensors, float ones as fp32 so fp16 files still give exact fp32 values; the caller's
    precision cast follows). ``CheckpointError`` names what does not fit architecture ``name``:
    missing and unexpected keys, shape mismatches. BatchNorm step counters
    (``num_batches_tracked``, training bookkeeping that OpenAI's archives may omit) are zeroed
    when absent."""
    expected = model.state_dict()
    counter = "num_batches_tracked"
    missing = sorted(k for k in set(expected) - set(sd) if not k.endswith(counter))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:4])}")
        raise CheckpointError(f"weights do not fit architecture {name}: " + "; ".join(parts))
    full = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    for k in expected:
        if k.endswith(counter) and k not in full:
            full[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(full, strict=True, assign=True)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read CLIP weights from a file or an HF folder, detecting the format from the content."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path}: truncated or corrupt zip archive: {e}") from e
        if any(re.fullmatch(r"[^/]+/(code/.*|constants\.pkl)", n) for n in names):
            sd, fmt = read_torchscript(path), "torchscript"
        else:
            sd, fmt = _torch_load(path), "torch"
    elif _looks_like_safetensors(head):
        return _read_safetensors(path)
    else:
        # Legacy (pre-zip) torch.save files have no magic we can test cheaply.
        sd, fmt = _torch_load(path), "torch"
    return Checkpoint(state_dict=to_openai_layout(sd), format=fmt, files=(path,))


def _read_safetensors(path: Path) -> Checkpoint:
    """A safetensors file; its metadata may state the architecture under ``clip_config``
    (open_clip's model-config JSON), which then beats inference from shapes."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file: {e}") from e
    config = None
    if "clip_config" in meta:
        try:
            config = CLIPConfig.from_dict(json.loads(meta["clip_config"]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: bad clip_config metadata: {e}") from e
    return Checkpoint(
        state_dict=to_openai_layout(sd), format="safetensors", config=config, files=(path,)
    )


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle (only tensors and plain containers are allowed): {e}"
        ) from e
    except Exception as e:  # torch raises RuntimeError for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def to_openai_layout(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap training checkpoints, strip DDP prefixes, convert HF keys, drop non-weights."""
    for wrapper in ("state_dict", "model", "module"):
        inner = sd.get(wrapper)
        if isinstance(inner, dict) and "token_embedding.weight" not in sd:
            sd = inner
            break
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        sd = hf_to_openai(sd)
    out = {}
    for k, v in sd.items():
        if _NON_WEIGHT_KEYS.search(k):
            continue
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v
    if "token_embedding.weight" not in out or not any(k.startswith("visual.") for k in out):
        sample = ", ".join(sorted(out)[:5])
        raise CheckpointError(
            f"not a CLIP state dict (no token_embedding.weight / visual.*); keys start: {sample}"
        )
    return out


def hf_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers CLIPModel state dict to OpenAI's layout.

    HF keeps q/k/v as three Linear layers; OpenAI packs them into in_proj_weight [3W, W] in
    q, k, v order. HF projections are Linear weights [out, in]; OpenAI's are matrices used as
    ``x @ proj`` [in, out], hence the transposes.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    simple = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        # "pre_layrnorm" is transformers' own spelling.
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "logit_scale": "logit_scale",
    }
    layer_parts = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    layer_re = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k.endswith("position_ids"):
            continue
        elif m := layer_re.match(k):
            tower, idx, part, kind = m.groups()
            prefix = ("visual." if tower == "vision" else "") + f"transformer.resblocks.{idx}."
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{prefix}attn.in_proj_{kind}", {})[part[-6]] = v
            elif part in layer_parts:
                out[f"{prefix}{layer_parts[part]}.{kind}"] = v
            else:
                raise CheckpointError(f"unexpected HF CLIP key {k!r}")
        else:
            raise CheckpointError(f"unexpected HF CLIP key {k!r}")
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"HF checkpoint lacks some of q/k/v for {name}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---------------------------------------------------------------- Hugging Face folders

_HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _read_hf_folder(folder: Path) -> Checkpoint:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} is a folder but has no config.json (HF CLIP layout)")
    hf = json.loads(cfg_path.read_text())
    config = hf_config_to_clip(hf)
    files: list[Path]
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = [folder / f for f in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise CheckpointError(
            f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    sd: dict[str, Any] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd.update(load_file(str(f)))
        else:
            sd.update(_torch_load(f))
    preprocess = None
    pp_path = folder / "preprocessor_config.json"
    if pp_path.is_file():
        preprocess = _hf_preprocess(json.loads(pp_path.read_text()), config.vision.image_size)
    return Checkpoint(
        state_dict=to_openai_layout(sd),
        format="hf",
        config=config,
        preprocess=preprocess,
        files=tuple(files),
    )


def hf_config_to_clip(hf: dict[str, Any]) -> CLIPConfig:
    """Map a transformers CLIPConfig dict (config.json) to our CLIPConfig.

    save_pretrained writes only values that differ from transformers' defaults, so the
    defaults of CLIPTextConfig / CLIPVisionConfig fill the gaps.
    """
    if hf.get("model_type", "clip") != "clip":
        raise CheckpointError(f"config.json model_type {hf.get('model_type')!r} is not 'clip'")
    tc = {
        "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
        "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    } | (hf.get("text_config") or {})  # fmt: skip
    vc = {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3,
    } | (hf.get("vision_config") or {})  # fmt: skip
    acts = {tc["hidden_act"], vc["hidden_act"]}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"unsupported HF activations {sorted(acts)} (need one of quick_gelu/gelu)")
    for eps in (tc["layer_norm_eps"], vc["layer_norm_eps"]):
        if abs(float(eps) - 1e-5) > 1e-12:
            raise CheckpointError(f"unsupported layer_norm_eps {eps} (CLIP uses 1e-5)")
    if vc["num_channels"] != 3:
        raise CheckpointError(f"unsupported num_channels {vc['num_channels']}")
    for key in ("image_size", "patch_size"):
        if isinstance(vc[key], list | tuple):
            if len(set(vc[key])) != 1:
                raise CheckpointError(f"non-square {key} {vc[key]} is not supported")
            vc[key] = vc[key][0]
    try:
        return CLIPConfig(
            embed_dim=int(hf.get("projection_dim", 512)),
            vision=VisionConfig(
                image_size=int(vc["image_size"]),
                layers=int(vc["num_hidden_layers"]),
                width=int(vc["hidden_size"]),
                patch_size=int(vc["patch_size"]),
                head_width=int(vc["hidden_size"]) // int(vc["num_attention_heads"]),
                mlp_ratio=vc["intermediate_size"] / vc["hidden_size"],
            ),
            text=TextConfig(
                context_length=int(tc["max_position_embeddings"]),
                vocab_size=int(tc["vocab_size"]),
                width=int(tc["hidden_size"]),
                heads=int(tc["num_attention_heads"]),
                layers=int(tc["num_hidden_layers"]),
                mlp_ratio=tc["intermediate_size"] / tc["hidden_size"],
            ),
            quick_gelu=acts == {"quick_gelu"},
        )
    except ValueError as e:
        raise CheckpointError(f"HF config.json describes an unsupported CLIP: {e}") from e


def _hf_preprocess(pp: dict[str, Any], image_size: int) -> PreprocessConfig:
    crop = pp.get("crop_size", image_size)
    if isinstance(crop, dict):
        crop = crop.get("height", image_size)
    return PreprocessConfig(
        image_size=int(crop),
        mean=tuple(pp.get("image_mean", PreprocessConfig.mean)),
        std=tuple(pp.get("image_std", PreprocessConfig.std)),
        interpolation=_HF_RESAMPLE.get(int(pp.get("resample", 3)), "bicubic"),
        crop_rounding="floor",  # CLIPImageProcessor's center_crop offset: (side - size) // 2
    )


# ---------------------------------------------------------------- architecture inference


def infer_config(sd: dict[str, torch.Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """Recover the architecture from an OpenAI-layout state dict's shapes.

    Attention head counts are not visible in the shapes; like OpenAI's loader we assume 64
    channels per head. Callers prefer a registered config whose shapes match (see factory).
    """
    try:
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
            hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            vision = VisionConfig(
                image_size=patch * grid, layers=layers, width=width, patch_size=patch,
                head_width=64 if width % 64 == 0 else width, mlp_ratio=hidden / width,
            )  # fmt: skip
        else:
            counts = tuple(
                len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                for b in (1, 2, 3, 4)
            )
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            spatial = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(image_size=spatial * 32, layers=counts, width=width, patch_size=None)
        embed_dim = sd["text_projection"].shape[1]
        t_width = sd["ln_final.weight"].shape[0]
        t_hidden = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        text = TextConfig(
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            width=t_width,
            heads=max(1, t_width // 64),
            layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
            mlp_ratio=t_hidden / t_width,
        )
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"cannot infer a CLIP architecture from the state dict: {e!r}") from e
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu)


def same_shapes(a: CLIPConfig, b: CLIPConfig) -> bool:
    """True when the two configs give identical parameter shapes (heads and activation aside)."""
    va, vb, ta, tb = a.vision, b.vision, a.text, b.text
    return (
        a.embed_dim == b.embed_dim
        and (va.image_size, va.layers, va.width, va.patch_size, va.mlp_ratio)
        == (vb.image_size, vb.layers, vb.width, vb.patch_size, vb.mlp_ratio)
        and (ta.context_length, ta.vocab_size, ta.width, ta.layers, ta.mlp_ratio)
        == (tb.context_length, tb.vocab_size, tb.width, tb.layers, tb.mlp_ratio)
    )


# ---------------------------------------------------------------- TorchScript archives

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a TorchScript module: records the pickled attribute dict, runs nothing."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_ignored: Any
) -> torch.Tensor:
    # requires_grad / backward hooks / metadata are irrelevant for weights.
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_ignored: Any) -> torch.Tensor:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, read_storage: Any) -> None:
        super().__init__(file)
        self._read_storage = read_storage
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (_ScriptObject,), {"qualname": key})
            return self._classes[key]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(
            f"TorchScript archive references {module}.{name}, which a weights file never needs"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        return self._read_storage(str(key), storage_type.dtype)


def read_torchscript(path: str | Path) -> dict[str, torch.Tensor]:
    """Flat ``name -> tensor`` dict of every tensor attribute in a TorchScript archive.

    Reads ``<root>/data.pkl`` with a restricted unpickler: ``__torch__.*`` classes become inert
    records, storages come from ``<root>/data/<key>``, and any other global is refused.
    """
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: not a zip archive: {e}") from e
    with z:
        pkls = [n for n in z.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one <root>/data.pkl, found {pkls}")
        root = pkls[0].split("/")[0]
        cache: dict[str, torch.Tensor] = {}

        def read_storage(key: str, dtype: torch.dtype) -> torch.Tensor:
            if key not in cache:
                try:
                    raw = z.read(f"{root}/data/{key}")
                except KeyError as e:
                    raise CheckpointError(f"{path}: storage {key} missing from archive") from e
                cache[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            return cache[key].view(dtype)

        try:
            obj = _RestrictedUnpickler(z.open(pkls[0]), read_storage).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refused: {e}") from e
        except (EOFError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: corrupt TorchScript data.pkl: {e}") from e
    out: dict[str, torch.Tensor] = {}
    _flatten(obj, "", out, set())
    if not out:
        raise CheckpointError(f"{path}: TorchScript archive holds no tensors")
    # Views into shared storages are cloned so each weight owns compact memory.
    return {k: v.clone() for k, v in out.items()}


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, _ScriptObject):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        state = getattr(obj, "state", None)
        if isinstance(state, dict):
            for k, v in state.items():
                _flatten(v, f"{prefix}{k}.", out, seen)
