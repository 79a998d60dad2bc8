"""The synthetic world's captions in Chinese, Russian and Hindi: same rows and ground truth in
every language, each language's script and grammar, English unchanged."""

from __future__ import annotations

import random
import re

import pytest

from testkit import languages as L
from testkit import synthetic as syn

SCRIPT = {
    "zh": re.compile(r"[\u4e00-\u9fff]"),
    "ru": re.compile(r"[\u0400-\u04ff]"),
    "hi": re.compile(r"[\u0900-\u097f]"),
}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("lang")
    knobs = dict(min_side=32, max_side=48, mismatch_rate=0.3, unsafe_rate=0.3)
    out = {"plain": syn.generate_world(root / "plain", 80, 11, "http://127.0.0.1/", **knobs)}
    for lang in L.LANGUAGES:
        out[lang] = syn.generate_world(root / lang, 80, 11, "http://127.0.0.1/", languages=lang, **knobs)
    return out


def test_same_rows_and_ground_truth_in_every_language(worlds):
    plain = worlds["plain"]
    assert "_gt_language" not in plain.column_names  # the classic world keeps its schema
    for lang in L.LANGUAGES:
        t = worlds[lang]
        assert t.column("_gt_language").to_pylist() == [lang] * t.num_rows
        assert t.drop(["caption", "_gt_language"]).equals(plain.drop(["caption"]))
    assert worlds["en"].column("caption").equals(plain.column("caption"))


def test_captions_are_written_in_their_language(worlds):
    for lang, script in SCRIPT.items():
        caps = worlds[lang].column("caption").to_pylist()
        assert all(script.search(c) for c in caps), lang
        assert not any(re.search(r"[a-z]{3,}", c) for c in caps), lang  # no English words left


def test_matched_captions_name_the_scene_in_every_language(worlds):
    # Single-group matched originals: the caption names the group's colour and shape.
    # Every form a word takes (number, gender, case).
    words = {
        "zh": ({c: (w,) for c, w in L._ZH_COLOR.items()}, {s: (w,) for s, w in L._ZH_SHAPE.items()}),
        "ru": ({c: f[:4] for c, f in L._RU_ADJ.items()}, {s: f[1:] for s, f in L._RU_SHAPE.items()}),
        "hi": ({c: f[:2] for c, f in L._HI_ADJ.items()}, L._HI_SHAPE),
    }
    for lang, (colors, shapes) in words.items():
        rows = [r for r in worlds[lang].to_pylist()
                if r["_gt_caption_matches"] and r["_gt_num_groups"] == 1]  # fmt: skip
        assert len(rows) > 10
        for r in rows:
            found = set(r["caption"].replace(",", " ").split()) if lang != "zh" else None
            for forms in (shapes[r["_gt_shape"]], colors[r["_gt_color"]]):
                if lang == "zh":
                    assert any(f in r["caption"] for f in forms), r["caption"]
                else:
                    assert found & set(forms), (lang, r["caption"])


def _plan(shape, color, count, count_word=0, size="small", with_size=False, position="center"):
    g = L.GroupPlan(shape, color, count, size, position, count_word, with_size, True)
    return L.CaptionPlan((g,), 0, None, None, 0, "blue")


@pytest.mark.parametrize(
    ("plan", "lang", "want"),
    [
        # Russian: gender and case after numerals (hand-checked).
        (_plan("star", "red", 2), "ru", "две красные звезды в центре"),
        (_plan("circle", "blue", 3), "ru", "три синих круга в центре"),
        (_plan("star", "yellow", 1, size="large", with_size=True), "ru", "большая жёлтая звезда в центре"),
        (_plan("cross", "black", 2, count_word=1), "ru", "пара чёрных крестов в центре"),
        (_plan("square", "green", 1, count_word=1), "ru", "один зелёный квадрат в центре"),
        # Hindi: masculine nouns, adjectives inflect for number.
        (_plan("star", "black", 2), "hi", "दो काले तारे बीच में"),
        (_plan("star", "black", 1), "hi", "एक काला तारा बीच में"),
        (_plan("circle", "red", 3, size="large", with_size=True), "hi", "तीन बड़े लाल वृत्त बीच में"),
        (_plan("triangle", "orange", 2), "zh", "两个橙色三角形位于中央"),
    ],
)
def test_grammar_of_hand_worked_captions(plan, lang, want):
    assert L.render(plan, lang) == want


def test_caption_choices_do_not_depend_on_the_language():
    for scene in syn.sample_scenes(200, 5, unsafe_rate=0.5):
        states = []
        for lang in L.LANGUAGES:
            rng = random.Random(scene.scene_id)
            syn.caption(scene, rng, language=lang)
            states.append(rng.getstate())
        assert all(s == states[0] for s in states)
    with pytest.raises(ValueError, match="unknown caption language"):
        syn.caption(syn.sample_scenes(1, 1)[0], random.Random(0), language="xx")
    with pytest.raises(ValueError, match="languages must be one of"):
        syn.generate_world("/nonexistent", 1, 1, "http://127.0.0.1/", languages={"de": 1.0})
