"""Contrastive (CLIP) training on the CPU: symmetric cross-entropy over the N x N logits.

This module knows models, losses, optimisers, checkpoints and named recipes (hyperparameters),
but no synthetic data: data providers are handed in by the caller. Two come with the project:

- a job's output: ``python -m clip_model.train --recipe R --data OUTPUT --out W`` streams the
  WebDataset shards the job committed (local folder or s3://) and trains on the rows its
  embeddings Parquet marks ``keep`` (``--all-rows``: every downloaded row), resumable from the
  last checkpoint (clip_model.job_data);
- the synthetic world that trains the bundled models lives in the test rig, whose entry point
  hands its batches to :func:`run_recipe` (see the models' cards for the commands).

A data factory is called as ``factory(image_size=..., batch_size=..., seed=...,
preprocess=model.preprocess_cfg, tokenizer=model.tokenizer)`` and returns ``batch(step) ->
(images, tokens)``: images float32 [B, 3, S, S] normalised for the model, tokens int64 [B, L]
right-padded with the tokenizer's pad id; caption i describes image i. ``batch`` must be a pure
function of ``step``, so runs are reproducible and resume exactly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
DataFactory = Callable[..., BatchFn]

# exp(logit_scale) is clamped to 100, as OpenAI and open_clip do, so the softmax never saturates.
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of one training run.

    model: architecture name (clip_model/configs/<model>.json).
    steps, batch_size: optimiser steps and pairs per step.
    lr, min_lr: peak and final learning rate of a linear-warmup + cosine schedule.
    warmup_steps: steps of linear warmup from 0 to lr.
    weight_decay: AdamW decay, applied to matrices only (not gains, biases, embeddings'
        positions or the temperature).
    betas, eps: AdamW moments.
    grad_clip: max global gradient L2 norm (None: no clipping).
    threads: torch intra-op threads; fixed so a re-run does the same float reductions. One
        thread: on a small, shared CPU box several OpenMP threads spin against each other and
        run ~5x slower than one.
    data_workers: processes that build batches ahead of the optimiser (0: in the loop).
    init: name of the recipe whose trained weights this one starts from (None: a seeded random
        init). The base's weights enter this stage rounded to float16, exactly as its saved file
        holds them, so training the base in the same run or loading its file gives the same
        result.
    neighbour_group: 0, or rows per neighbour group in batches regrouped by the model's own
        image embeddings (clip_model.neighbour_batches: hard negatives without labels; needs a
        data provider with ``pool()``, as a job output's reader has).
    neighbour_pool: steps per pool (the pool's rows are embedded and regrouped at its first
        step).
    neighbour_from: first step of neighbour batches; before it, the ordinary stream (a random
        init's embedding groups by little more than mean colour).
    """

    name: str
    model: str
    steps: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    threads: int = 1
    data_workers: int = 1
    init: str | None = None
    neighbour_group: int = 0
    neighbour_pool: int = 32
    neighbour_from: int = 100

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size < 2:
            raise ValueError(f"recipe {self.name}: need steps > 0 and batch_size >= 2")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"recipe {self.name}: need 0 <= min_lr <= lr")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"recipe {self.name}: need 0 <= warmup_steps < steps")
        if self.neighbour_group and not 2 <= self.neighbour_group <= self.batch_size:
            raise ValueError(
                f"recipe {self.name}: neighbour_group {self.neighbour_group} must be 0 (off) or "
                f"between 2 and batch_size {self.batch_size}"
            )
        if self.neighbour_pool < 1 or self.neighbour_from < 0:
            raise ValueError(f"recipe {self.name}: need neighbour_pool >= 1 and neighbour_from >= 0")


# Stage 1: the whole world, pairs of one-attribute twins.
_TINY_BASE = Recipe(
    name="tiny-synthetic-base",
    model="tiny-synthetic",
    steps=3000,
    batch_size=128,
    lr=1e-3,
    min_lr=1e-5,
    warmup_steps=50,
    weight_decay=0.1,
)
RECIPES: dict[str, Recipe] = {
    _TINY_BASE.name: _TINY_BASE,
    # Stage 2 (the bundled weights): the base, then batches with five-way shape sets, because
    # the base learns colour, layout and the hazard but plateaus on shape.
    "tiny-synthetic": replace(
        _TINY_BASE,
        name="tiny-synthetic",
        steps=2000,
        warmup_steps=30,
        init=_TINY_BASE.name,
    ),
    # A ResNet18-shaped image tower (width 32) and a 4-layer BERT with Flickr30k-style projection
    # heads and a learned temperature (clip_model/configs/multilingual-synthetic.json).
    "multilingual-synthetic-base": Recipe(
        name="multilingual-synthetic-base",
        model="multilingual-synthetic",
        steps=1800,
        batch_size=128,
        lr=1e-3,
        min_lr=1e-5,
        warmup_steps=60,
        weight_decay=0.1,
    ),
    # Stage 2 (the bundled weights): the base, then batches whose twins mostly differ by the
    # hazard sign, which the base tells apart less well than it matches captions.
    "multilingual-synthetic": Recipe(
        name="multilingual-synthetic",
        model="multilingual-synthetic",
        steps=500,
        batch_size=128,
        lr=3e-4,
        min_lr=1e-5,
        warmup_steps=20,
        weight_decay=0.1,
        init="multilingual-synthetic-base",
    ),
    # The same towers for short runs on a job's output (DataComp-style comparisons, CI), with
    # max-pool downsampling in the ResNet (clip_model/configs/towers-small.json): after 600 steps
    # on a job's output the strided trunk of multilingual-synthetic scored zero-shot colour
    # 0.00-0.24, this one 0.81-0.88 (bench/RESULTS.md, "Curation pays off downstream").
    "towers-small": Recipe(
        name="towers-small",
        model="towers-small",
        steps=600,
        batch_size=64,
        lr=1e-3,
        min_lr=1e-5,
        warmup_steps=30,
        weight_decay=0.1,
    ),
}


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's loss: mean of image->text and text->image cross-entropy over the N x N logits.

    image_features, text_features: [N, D], unit L2 norm, row i of each is a positive pair.
    logit_scale: scalar log-temperature; logits = exp(logit_scale) * image @ text.T.
    Returns a scalar tensor (nats).
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"need two [N, D] feature matrices, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    logits = logit_scale.exp() * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warmup to recipe.lr, then cosine decay to recipe.min_lr at recipe.steps."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * t))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay only weight matrices: decaying gains, biases, embeddings of position or the
    # temperature pulls them towards 0, which is not a prior anyone wants for them.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "positional_embedding" in name or "class_embedding" in name
        (no_decay if exempt or name.endswith("logit_scale") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class TrainResult:
    """losses[i] is the loss at step i (nats); seconds is the wall time of the loop."""

    losses: list[float]
    seconds: float


def train(
    model: nn.Module,
    batch: BatchFn,
    recipe: Recipe,
    *,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 200,
    run_id: str = "",
) -> TrainResult:
    """Train ``model`` in place (fp32, on the model's device) for ``recipe.steps`` steps.

    model: any clip_model model (encode_image, encode_text, logit_scale).
    batch: step -> (images [B, 3, S, S] float32, tokens [B, L] int64).
    checkpoint_dir: when given, the model, optimiser, step, losses and torch RNG state are saved
        there every ``checkpoint_every`` steps (``last.pt``, written atomically), and a run that
        finds a checkpoint of the same ``run_id`` there resumes from it: the batches are a pure
        function of the step (with neighbour batches: of the step and the pool's grouping, which
        the checkpoint holds), so the resumed run ends where an uninterrupted one would.
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps
    )
    losses: list[float] = []
    first = 0
    mined = None
    if recipe.neighbour_group:
        from .neighbour_batches import NeighbourBatches

        mined = NeighbourBatches(
            batch, batch_size=recipe.batch_size, group=recipe.neighbour_group, pool=recipe.neighbour_pool,
            start=min(recipe.neighbour_from, recipe.steps), steps=recipe.steps, log=log,
        )  # fmt: skip
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / "last.pt"
    if ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("run_id") != run_id:
            raise ValueError(
                f"{ckpt_path} belongs to another run ({state.get('run_id')!r}, this is "
                f"{run_id!r}); use another --checkpoint-dir or remove it"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        first, losses = int(state["step"]), [float(x) for x in state["losses"]]
        if mined is not None:
            mined.load_state(state.get("neighbours"))
        if log is not None:
            log(f"resumed from {ckpt_path} at step {first}/{recipe.steps}")
    model.train()
    start = time.perf_counter()
    if mined is None:
        batches = _prefetch(batch, first, recipe.steps, recipe.data_workers)
    else:
        # The ordinary stream until neighbour_from, then batches regrouped by the model as it is
        # when each pool starts (a generator: each is built just before its step runs).
        ordinary = max(first, mined.start)
        batches = itertools.chain(
            _prefetch(batch, first, ordinary, recipe.data_workers),
            (mined(step, model) for step in range(ordinary, recipe.steps)),
        )
    for step, (images, tokens) in zip(range(first, recipe.steps), batches, strict=False):
        lr = learning_rate(recipe, step)
        for group in opt.param_groups:
            group["lr"] = lr
        img = model.encode_image(images.to(device), normalize=True)
        txt = model.encode_text(tokens.to(device), normalize=True)
        loss = contrastive_loss(img, txt, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        if log is not None and (step % log_every == 0 or step == recipe.steps - 1):
            window = losses[-log_every:]
            log(
                f"step {step + 1}/{recipe.steps} loss {sum(window) / len(window):.4f} "
                f"lr {lr:.2e} temp {model.logit_scale.exp().item():.1f} "
                f"{time.perf_counter() - start:.0f}s"
            )
        done = step + 1
        if ckpt_path is not None and (done % checkpoint_every == 0 or done == recipe.steps):
            _save_checkpoint(ckpt_path, model, opt, done, losses, run_id,
                             None if mined is None else mined.state())  # fmt: skip
    model.eval()
    return TrainResult(losses=losses, seconds=time.perf_counter() - start)


def _save_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, losses: list[float],
    run_id: str, neighbours: dict | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "losses": torch.tensor(losses, dtype=torch.float64), "rng": torch.get_rng_state(),
            "run_id": run_id, "neighbours": neighbours,
        },
        tmp,
    )  # fmt: skip
    tmp.replace(path)


class _Steps(torch.utils.data.Dataset):
    """Index i -> batch(first + i): lets a DataLoader build batches in worker processes, in
    order."""

    def __init__(self, batch: BatchFn, first: int, steps: int) -> None:
        self.batch, self.first, self.steps = batch, first, steps

    def __len__(self) -> int:
        return self.steps - self.first

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(self.first + i)


def _prefetch(batch: BatchFn, first: int, steps: int, workers: int):
    if workers <= 0 or steps <= first:
        return (batch(step) for step in range(first, steps))
    return torch.utils.data.DataLoader(
        _Steps(batch, first, steps),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2,
        worker_init_fn=_one_thread,
    )


def _one_thread(_worker_id: int) -> None:
    # The worker only renders images; keep torch from spawning threads that fight the trainer.
    torch.set_num_threads(1)


def save_weights(
    model: nn.Module, path: str | Path, *, dtype: torch.dtype = torch.float16, metadata=None
) -> Path:
    """Write the model's state dict as safetensors (floating tensors cast to ``dtype``).

    metadata: optional str -> str mapping stored in the file header.
    """
    from safetensors.torch import save_file

    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=dict(metadata or {}))
    tmp.replace(path)
    return path


def _factory_for(recipe: Recipe, data: DataFactory | Mapping[str, DataFactory]) -> DataFactory:
    if callable(data):
        return data
    if recipe.name not in data:
        raise ValueError(f"no data provider for recipe {recipe.name}; have {sorted(data)}")
    return data[recipe.name]


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's architecture with a random init (seed the torch RNG first)."""
    from .factory import create_model

    model, _ = create_model(recipe.model, device="cpu")
    return model


def run_recipe(
    recipe: Recipe,
    seed: int,
    data: DataFactory | Mapping[str, DataFactory],
    *,
    log: Callable[[str], None] | None = None,
    init: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 200,
    run_id: str | None = None,
    log_every: int = 50,
) -> tuple[nn.Module, TrainResult]:
    """Build the recipe's model and train it on ``data``: a data factory, or recipe name ->
    factory (a recipe with a base recipe trains the base first on the base's own factory).

    The model starts from a seeded random init, or for a recipe with ``init`` from its base
    recipe's weights: read from ``init`` (a file the base recipe wrote, float16) when given,
    else trained here first with the same seed. ``checkpoint_dir``: see :func:`train` (the
    base of a two-stage recipe is not checkpointed).
    """
    from .factory import create_model

    if init is not None and recipe.init is None:
        raise ValueError(
            f"recipe {recipe.name} starts from a random init; it takes no init weights"
        )
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(seed)
    if recipe.init is None:
        model = build_model(recipe)
    elif init is not None:
        model, _ = create_model(recipe.model, pretrained=str(init), device="cpu")
    else:
        model, base = run_recipe(RECIPES[recipe.init], seed, data, log=log)
        if log is not None:
            log(f"base recipe {recipe.init} done in {base.seconds:.0f}s")
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(torch.float16))
    model = model.float()
    factory = _factory_for(recipe, data)
    batch = factory(
        image_size=model.image_size, batch_size=recipe.batch_size, seed=seed,
        preprocess=getattr(model, "preprocess_cfg", None), tokenizer=model.tokenizer,
    )  # fmt: skip
    rid = run_id if run_id is not None else json.dumps([asdict(recipe), seed])
    result = train(
        model, batch, recipe, log=log, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, run_id=rid, log_every=log_every,
    )  # fmt: skip
    return model, result


def weights_metadata(model: nn.Module, recipe: Recipe, seed: int, result: TrainResult) -> dict[str, str]:
    """The safetensors header of trained weights: the recipe, the seed, the final loss, and for
    tower models their architecture, tokenizer and preprocessing (so the file loads alone).
    Only deterministic facts, so a re-run writes the same header."""
    meta = {
        "recipe": json.dumps(asdict(recipe)),
        "seed": str(seed),
        "final_loss": f"{sum(result.losses[-50:]) / len(result.losses[-50:]):.4f}",
    }
    from .hf_model import TowerCLIP

    if isinstance(model, TowerCLIP):
        from .hf_formats import tower_metadata

        meta.update(tower_metadata(model))
    return meta


def parser(prog: str = "python -m clip_model.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the recipe's step count")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--threads", type=int, help="override the recipe's torch threads")
    p.add_argument(
        "--neighbour-batches", type=int, metavar="GROUP",
        help="build batches from groups of GROUP rows the model finds alike (hard negatives, "
        "re-mined every --neighbour-pool steps; needs --data); 0: off",
    )  # fmt: skip
    p.add_argument("--neighbour-pool", type=int, metavar="STEPS", help="steps per re-mined pool (default 32)")
    p.add_argument("--neighbour-from", type=int, metavar="STEP", help="first neighbour-batch step (default 100)")
    p.add_argument(
        "--data",
        help="a job's output (folder or s3://bucket/prefix): train on its committed shards' "
        "rows marked keep",
    )
    p.add_argument(
        "--all-rows", action="store_true",
        help="with --data: every downloaded row (status ok), not only those marked keep",
    )  # fmt: skip
    p.add_argument(
        "--init",
        help="weights file the recipe's base recipe wrote (skips training the base here)",
    )
    p.add_argument(
        "--checkpoint-dir",
        help="save a resumable checkpoint here every --checkpoint-every steps; a re-run of the "
        "same command resumes from it (default: <out>.ckpt)",
    )
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50, help="steps per progress line (mean loss over them)")
    p.add_argument("--fp32", action="store_true", help="store float32 instead of float16")
    return p


def main(
    argv: Sequence[str] | None = None,
    *,
    providers: Mapping[str, DataFactory] | None = None,
    prog: str = "python -m clip_model.train",
) -> int:
    """The command line. ``providers`` (recipe name -> data factory) is how a caller that owns
    data (the test rig's synthetic world) runs a recipe; without it, ``--data`` is required."""
    a = parser(prog).parse_args(argv)
    recipe = RECIPES[a.recipe]
    if a.steps is not None:
        recipe = replace(recipe, steps=a.steps, warmup_steps=min(recipe.warmup_steps, a.steps - 1))
    if a.batch_size is not None:
        recipe = replace(recipe, batch_size=a.batch_size)
    if a.threads is not None:
        recipe = replace(recipe, threads=a.threads)
    for field, flag, value in (
        ("neighbour_group", "--neighbour-batches", a.neighbour_batches),
        ("neighbour_pool", "--neighbour-pool", a.neighbour_pool),
        ("neighbour_from", "--neighbour-from", a.neighbour_from),
    ):
        if value is not None:
            try:
                recipe = replace(recipe, **{field: value})
            except ValueError as e:
                raise SystemExit(f"{flag}: {e}") from None
    if recipe.neighbour_group and not a.data:
        raise SystemExit("--neighbour-batches needs --data (a job output's reader hands over pools of rows)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data: DataFactory | Mapping[str, DataFactory]
    if a.data:
        if recipe.init is not None and a.init is None:
            raise SystemExit(f"recipe {recipe.name} has a base recipe: with --data pass --init BASE")
        from .job_data import job_output_batches

        def data(**kw):
            return job_output_batches(a.data, keep_only=not a.all_rows, log=log, **kw)
    elif providers:
        data = providers
    else:
        raise SystemExit(
            f"recipe {recipe.name}: no --data given; pass a job output (folder or s3://) to "
            "train on what the job kept"
        )
    ckpt = a.checkpoint_dir or (a.out + ".ckpt")
    model, result = run_recipe(
        recipe, a.seed, data, log=log, init=a.init, checkpoint_dir=ckpt,
        checkpoint_every=a.checkpoint_every, log_every=a.log_every,
        run_id=json.dumps([asdict(recipe), a.seed, a.data, a.all_rows]),
    )  # fmt: skip
    meta = weights_metadata(model, recipe, a.seed, result)
    if a.data:
        meta["data"] = a.data + (" (all rows)" if a.all_rows else " (kept rows)")
    out = save_weights(
        model, a.out, dtype=torch.float32 if a.fp32 else torch.float16, metadata=meta
    )
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {result.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
