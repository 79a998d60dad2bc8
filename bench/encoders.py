"""Throughput of clip_model's encoders against open_clip's, same architecture and weights.

    python bench/encoders.py [--model ViT-B-32] [--device cpu] [--precision fp32]
                             [--image-batch 32] [--text-batch 256] [--repeats 7]

Both models hold the same random weights (open_clip's seeded init, copied into ours) and run
under torch.inference_mode after a warm-up; each figure is the median of --repeats timed calls.

Captions: LAION captions are short with a long tail. Token counts (between SOT and EOT) are drawn
from a log-normal with median 12 and sigma 0.6, clipped to [1, 75]: about 80 % fall in 5-25
tokens and a few reach the 77-token context. Token ids are drawn uniformly from the BPE range,
which the encoders' cost does not depend on, so no tokenizer time is included.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time

import open_clip
import torch

import clip_model

SOT, EOT = 49406, 49407


def laion_like_tokens(n: int, context_length: int = 77, seed: int = 0) -> torch.Tensor:
    """[n, context_length] int64 token rows with LAION-like lengths (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(12) + 0.6 * torch.randn(n, generator=g)).round().long()
    lengths = lengths.clamp(1, context_length - 2)
    tokens = torch.zeros(n, context_length, dtype=torch.long)
    ids = torch.randint(256, SOT, (n, context_length), generator=g)
    pos = torch.arange(context_length)
    body = (pos >= 1) & (pos[None, :] <= lengths[:, None])
    tokens[body] = ids[body]
    tokens[:, 0] = SOT
    tokens[torch.arange(n), lengths + 1] = EOT
    return tokens


def time_call(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--image-batch", type=int, default=32)
    ap.add_argument("--text-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    torch.manual_seed(0)
    ref = open_clip.create_model(args.model).eval()
    ours, _ = clip_model.create_model(args.model, device="cpu")
    ours.load_state_dict(ref.state_dict())
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    # fp32 open_clip on the same device: the reference that reduced-precision outputs are held to.
    ref32 = ref.to(args.device) if dtype != torch.float32 else None
    ref32_out = None
    ref, ours = copy.deepcopy(ref).to(args.device, dtype), ours.to(args.device, dtype)

    size = ours.image_size
    images = torch.randn(args.image_batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    images = images.to(args.device, dtype)
    tokens = laion_like_tokens(args.text_batch).to(args.device)
    lengths = (tokens.argmax(-1) - 1).float()

    rows = []
    with torch.inference_mode():
        # Same weights, so the outputs must agree before any timing means anything.
        diff_i = (ours.encode_image(images) - ref.encode_image(images)).abs().max().item()
        diff_t = (ours.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item()
        if ref32 is not None:
            unit = torch.nn.functional.normalize
            ref32_out = max(
                (unit(ours.encode_image(images).float(), dim=-1)
                 - unit(ref32.encode_image(images.float()), dim=-1)).abs().max().item(),
                (unit(ours.encode_text(tokens).float(), dim=-1)
                 - unit(ref32.encode_text(tokens), dim=-1)).abs().max().item(),
            )  # fmt: skip
            del ref32
        for label, batch, run_ours, run_ref in (
            ("images/s", args.image_batch, lambda: ours.encode_image(images),
             lambda: ref.encode_image(images)),
            ("texts/s", args.text_batch, lambda: ours.encode_text(tokens),
             lambda: ref.encode_text(tokens)),
        ):  # fmt: skip
            t_ref = time_call(run_ref, args.repeats)
            t_ours = time_call(run_ours, args.repeats)
            rows.append((label, batch, batch / t_ours, batch / t_ref))

    print(f"model {args.model}, device {args.device}, {args.precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"caption tokens: median {lengths.median():.0f}, "
          f"5-25: {((lengths >= 5) & (lengths <= 25)).float().mean():.0%}, "
          f"max {lengths.max():.0f}; max abs diff image {diff_i:.2e}, text {diff_t:.2e}")  # fmt: skip
    if ref32_out is not None:
        print(f"max abs diff of clip_model {args.precision} vs open_clip fp32 (unit-norm embeddings): "
              f"{ref32_out:.2e}")  # fmt: skip
    print()
    print("| metric | batch | clip_model | open_clip | ratio |")
    print("|---|---|---|---|---|")
    for label, batch, ours_rate, ref_rate in rows:
        print(f"| {label} | {batch} | {ours_rate:.1f} | {ref_rate:.1f} | {ours_rate / ref_rate:.2f}x |")


if __name__ == "__main__":
    main()
