"""clip_model.neighbour_batches: regrouping a pool of rows into batches of neighbours, on
hand-worked examples (the job-output path and the trainer are in test_job_data.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_model.neighbour_batches import NeighbourBatches, group_into_batches


def _angles(*degrees: float) -> np.ndarray:
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_groups_take_the_anchor_and_its_nearest_unassigned_rows():
    # Pool order 0..7; the ordinary stream would batch [0, 1, 2, 3] and [4, 5, 6, 7].
    feats = _angles(0, 90, 5, 95, 180, 270, 185, 275)
    assert group_into_batches(feats, range(8), batch_size=4, group=2) == [[0, 2, 1, 3], [4, 6, 5, 7]]
    # One group of four: 0's nearest are 2 (cos 0.996), 7 (0.087), then 1 and 5 (both 0; the
    # earlier wins); the second batch is 3 (95 deg) and its nearest: 4 (85 deg away), 6 (90), 5.
    assert group_into_batches(feats, range(8), batch_size=4, group=4) == [[0, 2, 7, 1], [3, 4, 6, 5]]
    # group 1 is the ordinary stream.
    assert group_into_batches(feats, range(8), batch_size=4, group=1) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_copies_of_a_row_go_to_different_batches_while_they_can():
    # Pool positions 0 and 2 are the same row (a pool across an epoch boundary): identical
    # features, so each is the other's nearest neighbour.
    feats = _angles(0, 40, 0, 200)
    batches = group_into_batches(feats, [10, 11, 10, 12], batch_size=2, group=2)
    assert batches == [[0, 1], [2, 3]]
    # With nothing else left, the copies share a batch rather than the pool losing a row.
    assert group_into_batches(_angles(0, 0), [7, 7], batch_size=2, group=2) == [[0, 1]]


def test_every_pool_index_lands_in_exactly_one_batch():
    rng = np.random.default_rng(0)
    feats = F.normalize(torch.from_numpy(rng.normal(size=(96, 8))), dim=1).numpy()
    rows = list(rng.integers(0, 70, size=96))  # many repeats
    batches = group_into_batches(feats, rows, batch_size=16, group=5)
    assert all(len(b) == 16 for b in batches) and sorted(sum(batches, [])) == list(range(96))
    for b in batches:  # a row twice in a batch only where its other copies had no other place
        ids = [rows[i] for i in b]
        assert len(set(ids)) >= len(ids) - 1


def test_bad_pool_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of batch_size 4"):
        group_into_batches(_angles(0, 1, 2), range(3), batch_size=4, group=2)
    with pytest.raises(ValueError, match="group 5 must be between 1 and batch_size 4"):
        group_into_batches(_angles(0, 1, 2, 3), range(4), batch_size=4, group=5)
    with pytest.raises(ValueError, match="pool\\(\\) method"):
        NeighbourBatches(lambda step: None, batch_size=4, group=2, pool=2, start=0, steps=4)


class _AngleSource:
    """Rows whose 'pixels' are angles (one value per image) and whose tokens are row ids."""

    def __init__(self, degrees: list[float], batch_size: int) -> None:
        self.degrees, self.batch_size, self.calls = degrees, batch_size, []

    def pool(self, first_step: int, steps: int):
        self.calls.append((first_step, steps))
        idx = [p % len(self.degrees) for p in range(first_step * self.batch_size, (first_step + steps) * self.batch_size)]
        pixels = np.array([[[[self.degrees[i], 0, 0]]] for i in idx], dtype=np.float32)
        return pixels, torch.tensor(idx), idx

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)


class _AngleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.turn = nn.Parameter(torch.zeros(()))  # added to every angle (degrees)

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        rad = (x[:, 0, 0, 0] + self.turn) * math.pi / 180
        return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_pools_are_regrouped_by_the_model_at_their_first_step_and_resume_from_saved_groups():
    src = _AngleSource([0, 90, 5, 95, 180, 270, 185, 275], batch_size=4)
    model = _AngleModel()
    mined = NeighbourBatches(src, batch_size=4, group=2, pool=2, start=1, steps=5)
    # Pool [1, 3) holds stream positions 4..11 = rows 4..7, 0..3; batch 1 regroups them.
    assert mined(1, model)[1].tolist() == [4, 6, 5, 7]
    assert mined(2, model)[1].tolist() == [0, 2, 1, 3]
    assert src.calls == [(1, 2)]  # one fetch for the whole pool
    saved = mined.state()
    # Pool positions (not row ids): positions 0..3 hold rows 4..7.
    assert saved["first"] == 1 and saved["groups"].tolist() == [[0, 2, 1, 3], [4, 6, 5, 7]]
    # The last pool is cut at the run's end (step 4 only), and uses the model as it is then.
    assert mined(3, model)[1].tolist() == [4, 6, 5, 7] and src.calls[-1] == (3, 2)
    assert mined(4, model)[1].tolist() == [0, 2, 1, 3]
    # A resumed run inside pool [1, 3) uses the saved grouping, not the resumed model's, which
    # here would pair differently.
    resumed = NeighbourBatches(src, batch_size=4, group=2, pool=2, start=1, steps=5)
    resumed.load_state({"first": 1, "groups": torch.tensor([[0, 3, 1, 2], [4, 7, 5, 6]])})
    assert resumed(2, model)[1].tolist() == [0, 3, 1, 2]


def test_cosine_summary_equals_the_full_similarity_matrix() -> None:
    """The pool log's figures from row sums equal those of the n x n cosine matrix (float64
    reference): the mean off-diagonal cosine within each batch, averaged, and the pool's mean."""
    from clip_model.neighbour_batches import cosine_summary

    rng = np.random.default_rng(3)
    feats = rng.standard_normal((96, 16)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    groups = [list(range(s, s + 8)) for s in range(0, 96, 8)]
    groups[0] = [5, 40, 77, 3, 90, 12, 60, 33]  # any index lists, not only runs
    groups[1] = [0, 1, 2, 4, 6, 7, 8, 9]
    f = feats.astype(np.float64)
    sims = f @ f.T
    want_within = np.mean([sims[np.ix_(b, b)][~np.eye(len(b), dtype=bool)].mean() for b in groups])
    within, pool = cosine_summary(feats, groups)
    assert within == pytest.approx(want_within, abs=1e-9)
    assert pool == pytest.approx(sims.mean(), abs=1e-9)
    # Hand-worked: two identical rows and their opposite: within the pair 1, the pool 1/9.
    e = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    assert cosine_summary(e, [[0, 1]]) == pytest.approx((1.0, 1 / 9))
