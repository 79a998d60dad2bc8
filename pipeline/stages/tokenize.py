"""Tokenize stage: each caption -> its token ids with the embedding model's own tokenizer.

Runs in the CPU task beside decode and shard, so the embedding workers receive ready ids and
spend their time on the model. The tokenizer is the model's (``model.tokenizer``: CLIP's BPE,
or a Hugging Face text tower's), which is picklable and imports no torch.

Adds ``_tokens`` (list<int32>): the ids ``encode_text`` takes once right-padded with the
tokenizer's ``pad_id``, start and end tokens included, truncated to the model's context
length; null for a row without a caption. Every row gets ids whatever its status: a row whose
image failed still gets its text embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.stages.base import Resources, Stage


@dataclass
class TokenizeStage(Stage):
    """``caption`` -> ``_tokens``; ``tokenizer`` is the model's (``token_ids(texts)``)."""

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0))
    tokenizer: Any = None

    def process_batch(self, batch: pa.Table) -> pa.Table:
        captions = S.column_list(batch, S.CAPTION)
        with_text = [i for i, c in enumerate(captions) if isinstance(c, str)]
        rows: list[list[int] | None] = [None] * batch.num_rows
        if with_text:
            ids = self.tokenizer.token_ids([captions[i] for i in with_text])
            for i, t in zip(with_text, ids, strict=True):
                rows[i] = t
        return S.set_column(batch, S.TOKENS, pa.array(rows, pa.list_(pa.int32())))
