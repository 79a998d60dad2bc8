"""Train an unsafe-classifier head on labelled image embeddings (``clipcurate train-head``).

The head is what :class:`pipeline.stages.moderate.Head` loads: an MLP over the unit image
embedding (ReLU between layers, one sigmoid output, ``p_unsafe``), the shape of LAION's
CLIP-based NSFW detector, saved as safetensors (``layers.{i}.weight`` [out, in],
``layers.{i}.bias``) with metadata naming the model whose embeddings it reads.

    clipcurate train-head --input 'labelled/*.parquet' --label_col _gt_unsafe \\
        --out hazard-head.safetensors --hidden 32

The input is a job's output Parquet over a labelled sample (labels travel as additional
columns), so the head reads exactly the embeddings the job computes. Training: full-batch AdamW
on the binary cross-entropy with the positive class weighted by negatives/positives (unsafe rows
are rare), seeded. Pick the threshold afterwards with ``clipcurate calibrate --head``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.config import ConfigError, StorageConfig


def train_head(
    emb: np.ndarray,
    labels: np.ndarray,
    hidden: tuple[int, ...] = (32,),
    steps: int = 400,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """An MLP from float32 [N, D] embeddings to P(label); returns its tensors (float32) in the
    safetensors layout :class:`~pipeline.stages.moderate.Head` reads."""
    import torch

    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(f"need [N, D] embeddings and N labels, got {emb.shape} and {len(labels)}")
    y = np.asarray(labels, bool)
    if y.all() or not y.any():
        raise ValueError("need both unsafe and safe rows to train a head")
    g = torch.Generator().manual_seed(seed)
    sizes = [emb.shape[1], *hidden, 1]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        lin = torch.nn.Linear(a, b)
        with torch.no_grad():
            bound = 1 / a**0.5
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.zero_()
        layers.append(lin)
    x = torch.from_numpy(np.ascontiguousarray(emb, np.float32))
    t = torch.from_numpy(y.astype(np.float32))
    params = [p for lin in layers for p in lin.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    pos_weight = torch.tensor((~y).sum() / y.sum(), dtype=torch.float32)
    for _ in range(steps):
        h = x
        for k, lin in enumerate(layers):
            h = lin(h)
            if k < len(layers) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(h[:, 0], t, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {}
    for k, lin in enumerate(layers):
        out[f"layers.{k}.weight"] = lin.weight.detach().numpy().astype(np.float32)
        out[f"layers.{k}.bias"] = lin.bias.detach().numpy().astype(np.float32)
    return out


def labelled_embeddings(table: pa.Table, label_col: str) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(float32 [N, D] unit embeddings, bool [N] labels, model id) of the rows of an output
    table that have an image embedding and a label."""
    from pipeline.schema import embedding_matrix

    if label_col not in table.column_names:
        raise ConfigError(f"train-head: label column {label_col!r} not in the input ({table.column_names})")
    if S.IMAGE_EMBEDDING not in table.column_names:
        raise ConfigError("train-head: the input has no image_embedding column (a job's embeddings Parquet)")
    col = table.column(S.IMAGE_EMBEDDING)
    emb, ok = embedding_matrix(col, col.type.list_size)
    raw = table.column(label_col).to_pylist()
    have = ok & np.array([v is not None for v in raw])
    labels = np.array([bool(v) if isinstance(v, bool) else bool(v) and v != "" for v in raw])[have]
    models = {m for m in table.column(S.MODEL).to_pylist() if m} if S.MODEL in table.column_names else set()
    if len(models) > 1:
        raise ConfigError(f"train-head: the input mixes embeddings of several models: {sorted(models)}")
    return emb[have], labels, next(iter(models), None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="labelled output Parquet: file, folder, glob or s3://")
    p.add_argument("--label_col", required=True, help="bool (or concept-name) label of each row")
    p.add_argument("--out", required=True, help="safetensors file to write (path or s3://)")
    p.add_argument("--hidden", default="32", help="hidden layer sizes, comma-separated ('' = logistic regression)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s3_endpoint_url", default=None)


def run(a: argparse.Namespace) -> int:
    from safetensors.numpy import save

    from pipeline.calibrate import read_parquet
    from pipeline.storage import write_file

    storage = StorageConfig(s3_endpoint_url=a.s3_endpoint_url)
    try:
        hidden = tuple(int(h) for h in a.hidden.split(",") if h.strip())
        emb, labels, model = labelled_embeddings(read_parquet(a.input, storage), a.label_col)
        tensors = train_head(emb, labels, hidden, a.steps, a.lr, seed=a.seed)
    except (ConfigError, ValueError) as e:
        print(f"clipcurate train-head: error: {e}", file=sys.stderr)
        return 2
    # The head file's safetensors metadata (whose embeddings it reads, provenance), not columns.
    meta: dict[str, Any] = {"model": model or "", "input_dim": str(emb.shape[1]), "label_col": a.label_col,
                            "rows": str(len(labels)), "positives": str(int(labels.sum()))}
    write_file(a.out, save(tensors, metadata=meta), storage)
    print(f"wrote {a.out}: {emb.shape[1]} -> {' -> '.join(map(str, hidden))}{' -> ' if hidden else ''}1 "
          f"from {len(labels)} rows ({int(labels.sum())} positive); pick its threshold with "
          f"`clipcurate calibrate --head {a.out}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.head_train", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
