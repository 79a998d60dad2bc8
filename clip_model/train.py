"""Contrastive (CLIP) training on the CPU: symmetric cross-entropy over the N x N logits.

This module knows models, losses, optimisers and named recipes, but no data set: a recipe names
its data provider as ``"module:function"``, imported only when that recipe runs. That keeps
``clip_model`` free of any dependency on ``pipeline`` (the synthetic world that trains the bundled
``tiny-synthetic`` model lives in ``testkit``), while the documented command

    python -m clip_model.train --recipe tiny-synthetic --out clip_model/weights/tiny-synthetic.safetensors --seed 0

still reproduces the bundled weights (it trains the ``tiny-synthetic-base`` recipe first, then the
second stage from it; ``--init BASE.safetensors`` starts from a base file written earlier by
``--recipe tiny-synthetic-base``, with the same result). A data factory is called as
``factory(image_size=..., batch_size=..., seed=...)`` and returns ``batch(step) -> (images,
tokens)``: images float32 [B, 3, S, S] normalised for the model, tokens int64 [B, L]; caption i
describes image i. ``batch`` must be a pure function of ``step`` so that runs are reproducible.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
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
    data: "module:function" data factory (see the module docstring).
    init: name of the recipe whose trained weights this one starts from (None: a seeded random
        init). The base's weights enter this stage rounded to float16, exactly as its saved file
        holds them, so training the base in the same run or loading its file gives the same
        result.
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
    data: str = ""
    init: str | None = None

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size < 2:
            raise ValueError(f"recipe {self.name}: need steps > 0 and batch_size >= 2")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"recipe {self.name}: need 0 <= min_lr <= lr")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"recipe {self.name}: need 0 <= warmup_steps < steps")


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
    data="testkit.train_tiny:synthetic_batches",
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
        data="testkit.train_tiny:shape_set_batches",
        init=_TINY_BASE.name,
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
) -> TrainResult:
    """Train ``model`` in place (fp32, on the model's device) for ``recipe.steps`` steps.

    model: a clip_model CLIP (anything with encode_image, encode_text and logit_scale).
    batch: step -> (images [B, 3, S, S] float32, tokens [B, L] int64).
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps
    )
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step, (images, tokens) in enumerate(_prefetch(batch, recipe.steps, recipe.data_workers)):
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
    model.eval()
    return TrainResult(losses=losses, seconds=time.perf_counter() - start)


class _Steps(torch.utils.data.Dataset):
    """Index i -> batch(i): lets a DataLoader build batches in worker processes, in order."""

    def __init__(self, batch: BatchFn, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(step)


def _prefetch(batch: BatchFn, steps: int, workers: int):
    if workers <= 0:
        return (batch(step) for step in range(steps))
    return torch.utils.data.DataLoader(
        _Steps(batch, steps),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2,
        worker_init_fn=_one_thread,
    )


def _one_thread(_worker_id: int) -> None:
    # The worker only renders images; keep torch from spawning threads that fight the trainer.
    torch.set_num_threads(1)


def load_data_factory(spec: str) -> DataFactory:
    """Resolve ``"package.module:function"`` to the function (imported now, not before)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"data provider must look like 'module:function', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"{spec!r} does not name a callable")
    return factory


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


def run_recipe(
    recipe: Recipe,
    seed: int,
    *,
    log: Callable[[str], None] | None = None,
    init: str | Path | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Build the recipe's model and train it on its data provider.

    The model starts from a seeded random init, or for a recipe with ``init`` from its base
    recipe's weights: read from ``init`` (a file the base recipe wrote, float16) when given,
    else trained here first with the same seed.
    """
    from .factory import create_model_and_transforms

    if init is not None and recipe.init is None:
        raise ValueError(
            f"recipe {recipe.name} starts from a random init; it takes no init weights"
        )
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(seed)
    if recipe.init is None:
        model, _ = create_model_and_transforms(recipe.model)
    elif init is not None:
        model, _ = create_model_and_transforms(recipe.model, pretrained=str(init))
    else:
        model, base = run_recipe(RECIPES[recipe.init], seed, log=log)
        if log is not None:
            log(f"base recipe {recipe.init} done in {base.seconds:.0f}s")
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(torch.float16))
    model = model.float()
    factory = load_data_factory(recipe.data)
    batch = factory(image_size=model.image_size, batch_size=recipe.batch_size, seed=seed)
    return model, train(model, batch, recipe, log=log)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clip_model.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the recipe's step count")
    p.add_argument("--data", help="override the recipe's data provider (module:function)")
    p.add_argument(
        "--init",
        help="weights file the recipe's base recipe wrote (skips training the base here)",
    )
    p.add_argument("--fp32", action="store_true", help="store float32 instead of float16")
    a = p.parse_args(argv)
    recipe = RECIPES[a.recipe]
    if a.steps is not None:
        recipe = replace(recipe, steps=a.steps, warmup_steps=min(recipe.warmup_steps, a.steps - 1))
    if a.data:
        recipe = replace(recipe, data=a.data)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model, result = run_recipe(recipe, a.seed, log=log, init=a.init)
    # Only deterministic facts go in the header, so a re-run writes a byte-identical file.
    meta = {
        "recipe": json.dumps(asdict(recipe)),
        "seed": str(a.seed),
        "final_loss": f"{sum(result.losses[-50:]) / len(result.losses[-50:]):.4f}",
    }
    out = save_weights(
        model, a.out, dtype=torch.float32 if a.fp32 else torch.float16, metadata=meta
    )
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {result.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
