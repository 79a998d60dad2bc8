"""The CLIP model: an image tower and a causal text tower projected into one embedding space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .tokenizer import Tokenizer
from .transformer import LayerNorm, ModifiedResNet, Transformer, VisionTransformer

# Text rows per chunk below which splitting a batch by length stops paying (small GEMMs), and
# the most chunks one batch is cut into.
_MIN_TEXT_CHUNK = 32
_MAX_TEXT_CHUNKS = 8


class _Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device.

    The factory builds a model from weights on the meta device; there ``normal_`` runs torch's
    Python decomposition, whose first call imports ``torch._dynamo`` (~150 MiB resident and
    ~0.9 s in every process that loads a model: the driver and each embedding worker). Off the
    meta device the init is nn.Embedding's, so seeded random weights are unchanged."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class CLIP(nn.Module):
    """CLIP with OpenAI's / open_clip's state-dict layout.

    Attributes set by the factory: ``name`` (architecture, e.g. "ViT-B-32") and
    ``weights_sha256`` (sha256 hex of the weights file, None for random weights).

    The encoders follow the caller's autograd mode; for inference wrap calls in
    ``torch.inference_mode()`` (the pipeline and the benchmarks do).
    """

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.name: str = "custom"
        self.weights_sha256: str | None = None
        if cfg.vision.is_resnet:
            self.visual: nn.Module = ModifiedResNet(cfg.vision, cfg.embed_dim)
        else:
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        t = cfg.text
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.token_embedding = _Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.quick_gelu)
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        if not any(p.is_meta for p in self.parameters()):
            self.init_parameters()

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    @property
    def embed_dim(self) -> int:
        """Size of the shared embedding space (columns of encode_image / encode_text)."""
        return self.cfg.embed_dim

    @property
    def tokenizer(self) -> Tokenizer:
        """The text tower's tokenizer at this model's context length: ``token_ids(texts)`` gives
        the ids :meth:`encode_text` takes once right-padded with ``pad_id``. Picklable and
        torch-free, so CPU workers tokenize without the model."""
        from .tokenizer import _tokenizer_for

        return _tokenizer_for(None, self.context_length)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @torch.no_grad()
    def init_parameters(self) -> None:
        """Random initialisation with OpenAI's scales (std of each weight family)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.logit_scale.fill_(math.log(1 / 0.07))
        _init_transformer(self.transformer)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)
        v = self.visual
        if isinstance(v, VisionTransformer):
            scale = v.transformer.width**-0.5
            nn.init.normal_(v.class_embedding, std=scale)
            nn.init.normal_(v.positional_embedding, std=scale)
            nn.init.normal_(v.proj, std=scale)
            nn.init.normal_(v.conv1.weight, std=(3 * v.conv1.kernel_size[0] ** 2) ** -0.5)
            _init_transformer(v.transformer)
        else:
            pool = v.attnpool
            std = pool.c_proj.in_features**-0.5
            nn.init.normal_(pool.positional_embedding, std=std)
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
            for name, p in v.named_parameters():
                # Zero-init the last BN of each block so every residual branch starts as identity.
                if name.endswith("bn3.weight") and name.startswith("layer"):
                    nn.init.zeros_(p)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images: [N, 3, S, S] float, normalised as the weights' PreprocessConfig says.

        Returns [N, embed_dim] in the weights' dtype; unit L2 norm when normalize=True.
        """
        s = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise ValueError(f"encode_image expects [N, 3, {s}, {s}], got {tuple(images.shape)}")
        x = self.visual(images.to(self.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens: [N, L] integer ids (L <= context_length), SOT ... EOT then zero padding.

        The feature is read at each row's EOT, the largest id in the row. Positions after a
        row's EOT cannot influence it (causal attention), so rows are encoded in length-sorted
        chunks cut at each chunk's longest EOT; results equal the full-length computation.
        Returns [N, embed_dim]; unit L2 norm when normalize=True.
        """
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"encode_text expects [N, L<={self.context_length}] token ids, "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.dtype.is_floating_point:
            raise ValueError(f"token ids must be integers, got {tokens.dtype}")
        n = tokens.shape[0]
        if n == 0:
            return tokens.new_zeros((0, self.text_projection.shape[1]), dtype=self.dtype)
        eot = tokens.argmax(dim=-1)
        if n < 2 * _MIN_TEXT_CHUNK:
            x = self._encode_prefix(tokens, eot, int(eot.max()) + 1)
        else:
            # Captions vary a lot in length (LAION: median ~12 tokens, a tail to 77). Rows sorted
            # by length and cut into a few equal chunks let each chunk stop at its own longest
            # EOT, so short captions are not padded to the batch's longest.
            order = eot.argsort()
            chunks = order.tensor_split(min(_MAX_TEXT_CHUNKS, n // _MIN_TEXT_CHUNK))
            lengths = (eot[torch.stack([c[-1] for c in chunks])] + 1).tolist()
            parts = [
                self._encode_prefix(tokens[idx], eot[idx], length)
                for idx, length in zip(chunks, lengths, strict=True)
            ]
            x = torch.cat(parts)[order.argsort()]
        return F.normalize(x, dim=-1) if normalize else x

    def _encode_prefix(self, tokens: torch.Tensor, eot: torch.Tensor, length: int) -> torch.Tensor:
        """Text features of rows whose EOT lies before ``length``, from tokens[:, :length]."""
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]
        x = self.transformer(x, causal=True)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        # LayerNorm acts per token, so normalising only the pooled EOT token is exact.
        return self.ln_final(x) @ self.text_projection

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img]):
        cosine similarities times exp(logit_scale)."""
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


def _init_transformer(t: Transformer) -> None:
    width, depth = t.width, len(t.resblocks)
    proj_std = width**-0.5 * (2 * depth) ** -0.5
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    for block in t.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.zeros_(block.mlp.c_fc.bias)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.zeros_(block.mlp.c_proj.bias)
