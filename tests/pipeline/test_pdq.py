"""PDQ hashes of the 64 x 64 grid, computed in numpy (pipeline/blocklist/pdq.py), against the
reference implementation (``pdqhash``, Meta's C++ through its Python binding) on the same
grid: the synthetic world's scenes with photo-like texture, and the shared photographs."""

from __future__ import annotations

import random

import numpy as np
import pdqhash
import pytest
from PIL import Image

from pipeline.blocklist.pdq import _grid, pdq_dihedral_of, pdq_distance, pdq_of
from testkit import synthetic as syn
from testkit.hostile_images import TESTDATA
from testkit.photo_like import texturize_image


def _pictures() -> list[Image.Image]:
    rng = random.Random(7)
    pics = []
    for i, scene in enumerate(syn.sample_scenes(160, 3)):
        size = (rng.randint(120, 400), rng.randint(120, 400))
        pic = texturize_image(syn.render(scene, size), seed=i)
        pics.append(pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 3 == 0 else pic)
    pics += [Image.open(p).convert("RGB") for p in sorted(TESTDATA.glob("*.jpg"))]
    return pics


PICTURES = _pictures()


def _packed(bits: object) -> bytes:
    return np.packbits(np.asarray(bits).astype(np.uint8)).tobytes()


def test_pdq_of_is_the_reference_hash_of_the_grid_bit_for_bit() -> None:
    assert len(PICTURES) > 160
    for pic in PICTURES:
        bits, _quality = pdqhash.compute(_grid(pic))
        assert pdq_of(pic) == _packed(bits)


def test_dihedral_hashes_are_the_references_in_its_order() -> None:
    # The reference's dihedral path filters the grid once more (a running-sum box of width
    # one), whose float rounding can move a coefficient across the median: a bit or two.
    worst = []
    for pic in PICTURES:
        vectors, _quality = pdqhash.compute_dihedral(_grid(pic))
        mine = pdq_dihedral_of(pic)
        assert mine[0] == pdq_of(pic)
        worst.append(max(pdq_distance(m, _packed(v)) for m, v in zip(mine, vectors, strict=True)))
    assert max(worst) <= 4 and sum(w == 0 for w in worst) >= 0.95 * len(worst)


@pytest.mark.parametrize("turn", [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                  Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE])
def test_a_turned_picture_is_found_among_the_dihedral_hashes(turn: Image.Transpose) -> None:
    for pic in PICTURES[:20]:
        square = pic.resize((128, 128))
        turned = pdq_of(square.transpose(turn))
        assert min(pdq_distance(turned, h) for h in pdq_dihedral_of(square)) <= 8
