"""clip_model.job_data: the trainer's reader of a job's output (shards + embeddings Parquet),
from a local folder and from S3, on a hand-made output in the job's layout (the job itself
writes one in tests/jobs/test_multilingual_job.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from clip_model.config import PreprocessConfig
from clip_model.job_data import JobOutputError, epoch_order, index_rows, job_output_batches
from clip_model.tokenizer import default_tokenizer

PP = PreprocessConfig(image_size=32)
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}


def _jpeg(color: tuple[int, int, int], texture: int | None = None) -> bytes:
    """A 48x40 JPEG of ``color``; with ``texture`` (a seed), plus +-40 levels of noise."""
    pixels = np.broadcast_to(np.array(color, np.int16), (40, 48, 3))
    if texture is not None:
        pixels = pixels + np.random.default_rng(texture).integers(-40, 41, (40, 48, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_output(
    root: Path, shards: int = 3, per_shard: int = 6, uncommitted: int = 1, textured: bool = False
) -> dict:
    """A job output: ``shards`` committed shards plus ``uncommitted`` without a manifest.
    Rows alternate keep True/False; one row per shard failed (no image in the tar).
    textured: each image gets its own noise (else a colour's images are identical)."""
    (root / "shards").mkdir(parents=True)
    (root / "embeddings").mkdir()
    truth = {}
    for s in range(shards + uncommitted):
        name = f"{s:05d}"
        keys, keep, status, caption = [], [], [], []
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{name}{i:04d}"
                color = list(COLORS)[(s + i) % 3]
                ok = i != per_shard - 1
                keys.append(key)
                keep.append(ok and i % 2 == 0)
                status.append("ok" if ok else "http_404")
                caption.append(f"a {color} square")
                if ok:
                    for ext, data in (("jpg", _jpeg(COLORS[color], s * per_shard + i if textured else None)), ("txt", caption[-1].encode()),
                                      ("json", json.dumps({"key": key}).encode())):  # fmt: skip
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                truth[key] = (color, keep[-1], ok, s < shards)
        (root / "shards" / f"{name}.tar").write_bytes(tar_buf.getvalue())
        if s < shards:
            (root / "shards" / f"{name}.manifest.json").write_text("{}")
        pq.write_table(
            pa.table({"key": keys, "keep": keep, "status": status, "caption": caption}),
            root / "embeddings" / f"{name}.parquet",
        )
    return truth


def _batches(root: str, keep_only: bool = True, batch_size: int = 4, seed: int = 0):
    return job_output_batches(root, image_size=32, batch_size=batch_size, seed=seed,
                              preprocess=PP, tokenizer=default_tokenizer(), keep_only=keep_only)  # fmt: skip


def test_index_counts_only_committed_rows_and_the_kept_ones(tmp_path):
    truth = write_output(tmp_path)
    rows, counts = index_rows(str(tmp_path))
    assert counts == {"rows": 18, "ok": 15, "kept": 9, "shards": 3}
    assert {r.key for r in rows} == {k for k, (_, keep, ok, com) in truth.items() if keep and ok and com}
    all_rows, _ = index_rows(str(tmp_path), keep_only=False)
    assert len(all_rows) == 15
    with pytest.raises(JobOutputError, match="no committed shards"):
        index_rows(str(tmp_path / "nope"))


def test_batches_pair_each_image_with_its_caption_and_repeat_per_step(tmp_path):
    truth = write_output(tmp_path)
    make = _batches(str(tmp_path))
    images, tokens = make(2)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (4, 77) and tokens.dtype == torch.int64
    for row, img in zip(make.rows_of(2), images, strict=True):
        color = truth[row.key][0]
        assert row.caption == f"a {color} square"
        # The image's dominant channel is its colour's (normalised pixels, mean per channel).
        assert int(img.mean(dim=(1, 2)).argmax()) == {"red": 0, "green": 1, "blue": 2}[color]
    again = _batches(str(tmp_path))(2)  # a fresh reader (a resumed run) gives the same batch
    assert torch.equal(again[0], images) and torch.equal(again[1], tokens)


def test_epochs_visit_every_row_once_in_a_seeded_order(tmp_path):
    write_output(tmp_path, shards=4)
    rows, _ = index_rows(str(tmp_path))
    for epoch in range(3):
        order = epoch_order(rows, seed=5, epoch=epoch, window=2)
        assert sorted(order) == list(range(len(rows)))
    assert epoch_order(rows, 5, 0, 2) != epoch_order(rows, 5, 1, 2)
    assert epoch_order(rows, 5, 0, 2) == epoch_order(rows, 5, 0, 2)
    make = _batches(str(tmp_path), batch_size=len(rows))
    assert sorted(r.key for r in make.rows_of(0)) == sorted(r.key for r in rows)


def test_reads_the_same_batches_from_s3(tmp_path, s3_server, s3_bucket):
    write_output(tmp_path)
    client = s3_server.client()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"run/{path.relative_to(tmp_path)}", Body=path.read_bytes())
    local, remote = _batches(str(tmp_path)), _batches(f"s3://{s3_bucket}/run")
    for step in (0, 3):
        a, b = local(step), remote(step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.isfinite(a[0].numpy()).all()


def test_pools_hold_the_streams_rows_and_neighbour_batches_group_them(tmp_path):
    """Regrouped by an 'encoder' that returns the mean colour, a pool that is one whole epoch
    (24 rows, 8 of each colour) becomes three single-colour batches of the same rows."""
    from clip_model.neighbour_batches import NeighbourBatches

    truth = write_output(tmp_path, shards=4, per_shard=12)
    make = _batches(str(tmp_path), batch_size=8)
    pixels, tokens, rows = make.pool(0, 3)
    assert pixels.shape == (24, 32, 32, 3) and pixels.dtype == np.uint8 and len(rows) == 24
    ordinary = [make.rows_of(step) for step in range(3)]
    assert [make.rows[i] for i in rows] == sum(ordinary, [])
    assert torch.equal(make.normalize(pixels[:8]), make(0)[0]) and torch.equal(tokens[:8], make(0)[1])

    class MeanColour(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def encode_image(self, x, normalize=True):
            return torch.nn.functional.normalize(x.mean(dim=(2, 3)) * self.w, dim=1)

    def colours(keys):
        return [truth[k][0] for k in keys]

    mined = NeighbourBatches(make, batch_size=8, group=8, pool=3, start=0, steps=3)
    tok = default_tokenizer()
    caption_of = {tuple(tok([r.caption])[0].tolist()): r.caption for r in make.rows}
    seen = []
    for step in range(3):
        images, toks = mined(step, MeanColour())
        caps = [caption_of[tuple(t.tolist())] for t in toks]
        assert len(set(caps)) == 1, caps  # one colour per batch
        colour = caps[0].split()[1]
        # images still match their captions
        assert {int(i.mean(dim=(1, 2)).argmax()) for i in images} == {{"red": 0, "green": 1, "blue": 2}[colour]}
        seen.append(colour)
    assert sorted(seen) == sorted(COLORS)
    assert any(len(set(colours(r.key for r in b))) > 1 for b in ordinary)  # the stream mixes them


def _tiny_clip(seed: int):
    from clip_model.config import CLIPConfig
    from clip_model.model import CLIP

    torch.manual_seed(seed)
    return CLIP(CLIPConfig.from_dict({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))  # fmt: skip


def test_training_with_neighbour_batches_resumes_inside_a_pool_exactly(tmp_path):
    """Pools at steps 1-3 and 4-6; a run dies after step 4's line is logged, before its
    checkpoint, so it resumes from step 2, inside the first pool, whose grouping (made by the
    step-1 model) only the checkpoint still knows."""
    from dataclasses import replace

    from clip_model import train as tr

    torch.set_num_threads(1)
    # Textured images: a colour's rows are not identical, so the grouping depends on the model.
    write_output(tmp_path / "out", shards=4, per_shard=12, textured=True)
    recipe = replace(tr.RECIPES["towers-small"], steps=7, batch_size=8, warmup_steps=1, data_workers=0, lr=1e-2,
                     neighbour_group=4, neighbour_pool=3, neighbour_from=1)  # fmt: skip
    lines: list[str] = []
    whole = _tiny_clip(3)
    full = tr.train(whole, _batches(str(tmp_path / "out"), batch_size=8), recipe, checkpoint_dir=tmp_path / "a",
                    checkpoint_every=2, run_id="r", log=lines.append, log_every=1)  # fmt: skip
    pools = [ln for ln in lines if ln.startswith("neighbour pool")]
    assert [p.split(":")[0] for p in pools] == ["neighbour pool at step 2", "neighbour pool at step 5"]
    assert all("24 rows in 3 batches" in p for p in pools)

    def dying(msg: str) -> None:
        if msg.startswith("step 4/7"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.train(_tiny_clip(3), _batches(str(tmp_path / "out"), batch_size=8), recipe,
                 checkpoint_dir=tmp_path / "b", checkpoint_every=2, run_id="r", log=dying, log_every=1)  # fmt: skip
    again: list[str] = []
    resumed = _tiny_clip(99)
    res = tr.train(resumed, _batches(str(tmp_path / "out"), batch_size=8), recipe, checkpoint_dir=tmp_path / "b",
                   checkpoint_every=2, run_id="r", log=again.append, log_every=1)  # fmt: skip
    assert "at step 2/7" in again[0]
    assert res.losses == full.losses and len(res.losses) == 7
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_with_neighbour_batches_and_names_a_bad_flag(tmp_path):
    import subprocess
    import sys

    write_output(tmp_path / "out", shards=4, per_shard=12)
    base = [sys.executable, "-m", "clip_model.train", "--recipe", "towers-small", "--data", str(tmp_path / "out"),
            "--steps", "3", "--batch-size", "8", "--out", str(tmp_path / "w.safetensors")]  # fmt: skip
    bad = subprocess.run([*base, "--neighbour-batches", "9"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--neighbour-batches: recipe towers-small: neighbour_group 9" in bad.stderr
    proc = subprocess.run([*base, "--neighbour-batches", "4", "--neighbour-from", "1", "--neighbour-pool", "1"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert proc.stderr.count("neighbour pool at step") == 2 and "step 3/3" in proc.stderr
    import clip_model

    clip_model.create_model_and_transforms(str(tmp_path / "w.safetensors"), device="cpu")
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        recipe = json.loads(f.metadata()["recipe"])
    assert (recipe["neighbour_group"], recipe["neighbour_pool"], recipe["neighbour_from"]) == (4, 1, 1)
