"""The synthetic world's captions in other languages: Chinese, Russian (Cyrillic), Hindi
(Devanagari), besides English.

A caption is first planned (which count word, whether size and position are named, the joiner,
the hazard phrase, the template, the prefix: every random choice, drawn exactly as the English
captions always drew them) and then rendered in one language. So a world captioned in Chinese
has the same rows, images, mismatches and hazards as the same seed in English, and the English
rendering is byte-for-byte what the world produced before languages existed.

Each language's tables translate the world's finite vocabulary (5 shapes, 9 colours, 2 sizes,
5 positions, counts 1-3); Russian and Hindi adjectives agree with their nouns (gender, number,
case after numerals), written out per word rather than generated.
"""

from __future__ import annotations

from dataclasses import dataclass

LANGUAGES: tuple[str, ...] = ("en", "zh", "ru", "hi")

# How many alternatives each random choice has (the English tables' lengths): a rendering in
# any language indexes its own tables with the same numbers.
N_JOINERS = 3
N_HAZARD_PHRASES = 6
N_TEMPLATES = 4
N_PREFIXES = 7


@dataclass(frozen=True)
class GroupPlan:
    shape: str
    color: str
    count: int
    size: str
    position: str
    count_word: int  # index into the language's count words for this count
    with_size: bool
    with_position: bool


@dataclass(frozen=True)
class CaptionPlan:
    groups: tuple[GroupPlan, ...]
    joiner: int
    hazard_phrase: int | None  # None: the hazard is not mentioned
    template: int | None  # None: no background phrase
    prefix: int
    background: str


# ---------------------------------------------------------------- Chinese

_ZH_COLOR = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "orange": "橙色",
    "purple": "紫色", "white": "白色", "black": "黑色", "gray": "灰色",
}  # fmt: skip
_ZH_SHAPE = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形"}
_ZH_COUNT = {1: ("一个", "一个", "单独一个"), 2: ("两个", "一对"), 3: ("三个",)}
_ZH_SIZE = {"small": "小的", "large": "大的"}
_ZH_POS = {
    "top left": "左上角", "top right": "右上角", "bottom left": "左下角",
    "bottom right": "右下角", "center": "中央",
}  # fmt: skip
_ZH_JOIN = ("和", "，", "以及")
_ZH_HAZARD = (
    "，还有一个危险标志", "和一个危险标志", "，旁边是一个黄黑条纹的菱形",
    "，带有一个警告标志", "和一个危险警示牌", "，带有条纹危险符号",
)  # fmt: skip
_ZH_TEMPLATES = ("{bg}背景上的{o}", "{bg}背景，上面有{o}", "{o}，{bg}背景", "纯{bg}背景前的{o}")
_ZH_PREFIX = ("", "", "一张照片：", "一张图片：", "一幅图：", "一幅画：", "剪贴画：")


def _zh_group(g: GroupPlan) -> str:
    text = _ZH_COUNT[g.count][g.count_word]
    if g.with_size:
        text += _ZH_SIZE[g.size]
    text += _ZH_COLOR[g.color] + _ZH_SHAPE[g.shape]
    if g.with_position:
        text += "位于" + _ZH_POS[g.position]
    return text


def _zh(plan: CaptionPlan) -> str:
    objects = _ZH_JOIN[plan.joiner].join(_zh_group(g) for g in plan.groups)
    if plan.hazard_phrase is not None:
        objects += _ZH_HAZARD[plan.hazard_phrase]
    body = objects
    if plan.template is not None:
        body = _ZH_TEMPLATES[plan.template].format(bg=_ZH_COLOR[plan.background], o=objects)
    return _ZH_PREFIX[plan.prefix] + body


# ---------------------------------------------------------------- Russian

# Noun forms: gender, nominative singular, genitive singular (after 2-4), genitive plural.
_RU_SHAPE = {
    "circle": ("m", "круг", "круга", "кругов"),
    "square": ("m", "квадрат", "квадрата", "квадратов"),
    "triangle": ("m", "треугольник", "треугольника", "треугольников"),
    "star": ("f", "звезда", "звезды", "звёзд"),
    "cross": ("m", "крест", "креста", "крестов"),
}
# Adjective forms: masc. nom. sg., fem. nom. sg., gen. pl., nom. pl., masc. prep. sg.
_RU_ADJ = {
    "red": ("красный", "красная", "красных", "красные", "красном"),
    "green": ("зелёный", "зелёная", "зелёных", "зелёные", "зелёном"),
    "blue": ("синий", "синяя", "синих", "синие", "синем"),
    "yellow": ("жёлтый", "жёлтая", "жёлтых", "жёлтые", "жёлтом"),
    "orange": ("оранжевый", "оранжевая", "оранжевых", "оранжевые", "оранжевом"),
    "purple": ("фиолетовый", "фиолетовая", "фиолетовых", "фиолетовые", "фиолетовом"),
    "white": ("белый", "белая", "белых", "белые", "белом"),
    "black": ("чёрный", "чёрная", "чёрных", "чёрные", "чёрном"),
    "gray": ("серый", "серая", "серых", "серые", "сером"),
    "small": ("маленький", "маленькая", "маленьких", "маленькие", "маленьком"),
    "large": ("большой", "большая", "больших", "большие", "большом"),
}
_RU_POS = {
    "top left": "в левом верхнем углу", "top right": "в правом верхнем углу",
    "bottom left": "в левом нижнем углу", "bottom right": "в правом нижнем углу",
    "center": "в центре",
}  # fmt: skip
_RU_JOIN = (" и ", ", ", " а также ")
_RU_HAZARD = (
    "со знаком опасности", "и знак опасности", "рядом с жёлто-чёрным полосатым ромбом",
    "с предупреждающим знаком", "и знак «опасно»", "с полосатым символом опасности",
)  # fmt: skip
_RU_TEMPLATES = (
    "{o} на {bg_prep} фоне", "{bg_nom} фон, на нём {o}", "{o}, {bg_nom} фон",
    "{o} на однотонном {bg_prep} фоне",
)  # fmt: skip
_RU_PREFIX = ("", "", "фото: ", "изображение: ", "картинка: ", "рисунок: ", "клипарт: ")


def _ru_group(g: GroupPlan) -> str:
    gender, nom_sg, gen_sg, gen_pl = _RU_SHAPE[g.shape]
    adjs = ([g.size] if g.with_size else []) + [g.color]
    if g.count == 1:
        form = 0 if gender == "m" else 1
        lead = ("", "один" if gender == "m" else "одна", "всего один" if gender == "m" else "всего одна")
        words = [lead[g.count_word]] + [_RU_ADJ[a][form] for a in adjs] + [nom_sg]
    elif g.count == 2 and g.count_word == 1:  # "a pair of": пара + gen. pl.
        words = ["пара"] + [_RU_ADJ[a][2] for a in adjs] + [gen_pl]
    else:
        numeral = {2: "два" if gender == "m" else "две", 3: "три"}[g.count]
        # After 2-4 masculine adjectives take the genitive plural, feminine the nominative.
        form = 2 if gender == "m" else 3
        words = [numeral] + [_RU_ADJ[a][form] for a in adjs] + [gen_sg]
    text = " ".join(w for w in words if w)
    if g.with_position:
        text += " " + _RU_POS[g.position]
    return text


def _ru(plan: CaptionPlan) -> str:
    objects = _RU_JOIN[plan.joiner].join(_ru_group(g) for g in plan.groups)
    if plan.hazard_phrase is not None:
        objects += " " + _RU_HAZARD[plan.hazard_phrase]
    body = objects
    if plan.template is not None:
        adj = _RU_ADJ[plan.background]
        body = _RU_TEMPLATES[plan.template].format(o=objects, bg_prep=adj[4], bg_nom=adj[0])
    return _RU_PREFIX[plan.prefix] + body


# ---------------------------------------------------------------- Hindi

# All five shape nouns are masculine: (singular, plural).
_HI_SHAPE = {
    "circle": ("वृत्त", "वृत्त"), "square": ("वर्ग", "वर्ग"), "triangle": ("त्रिभुज", "त्रिभुज"),
    "star": ("तारा", "तारे"), "cross": ("क्रॉस", "क्रॉस"),
}  # fmt: skip
# Adjectives: masc. sg., masc. pl., fem. (invariable ones repeat).
_HI_ADJ = {
    "red": ("लाल", "लाल", "लाल"), "green": ("हरा", "हरे", "हरी"),
    "blue": ("नीला", "नीले", "नीली"), "yellow": ("पीला", "पीले", "पीली"),
    "orange": ("नारंगी", "नारंगी", "नारंगी"), "purple": ("बैंगनी", "बैंगनी", "बैंगनी"),
    "white": ("सफ़ेद", "सफ़ेद", "सफ़ेद"), "black": ("काला", "काले", "काली"),
    "gray": ("स्लेटी", "स्लेटी", "स्लेटी"),
    "small": ("छोटा", "छोटे", "छोटी"), "large": ("बड़ा", "बड़े", "बड़ी"),
}  # fmt: skip
_HI_COUNT = {1: ("एक", "एक", "सिर्फ़ एक"), 2: ("दो", "एक जोड़ी"), 3: ("तीन",)}
_HI_POS = {
    "top left": "ऊपर बाईं ओर", "top right": "ऊपर दाईं ओर", "bottom left": "नीचे बाईं ओर",
    "bottom right": "नीचे दाईं ओर", "center": "बीच में",
}  # fmt: skip
_HI_JOIN = (" और ", ", ", " के साथ ")
_HI_HAZARD = (
    "और एक ख़तरे का निशान", "के साथ एक ख़तरे का निशान", "पीले-काले धारीदार हीरे के पास",
    "और एक चेतावनी चिह्न", "और एक ख़तरा संकेत", "धारीदार ख़तरे के प्रतीक के साथ",
)  # fmt: skip
# पृष्ठभूमि (background) is feminine.
_HI_TEMPLATES = (
    "{bg} पृष्ठभूमि पर {o}", "{bg} पृष्ठभूमि, जिस पर {o}", "{o}, {bg} पृष्ठभूमि",
    "सादी {bg} पृष्ठभूमि पर {o}",
)  # fmt: skip
_HI_PREFIX = ("", "", "एक फ़ोटो: ", "एक छवि: ", "एक तस्वीर: ", "एक चित्र: ", "क्लिप आर्ट: ")


def _hi_group(g: GroupPlan) -> str:
    number = 0 if g.count == 1 else 1
    adjs = ([g.size] if g.with_size else []) + [g.color]
    words = [_HI_COUNT[g.count][g.count_word]] + [_HI_ADJ[a][number] for a in adjs]
    words.append(_HI_SHAPE[g.shape][number])
    text = " ".join(words)
    if g.with_position:
        text += " " + _HI_POS[g.position]
    return text


def _hi(plan: CaptionPlan) -> str:
    objects = _HI_JOIN[plan.joiner].join(_hi_group(g) for g in plan.groups)
    if plan.hazard_phrase is not None:
        objects += " " + _HI_HAZARD[plan.hazard_phrase]
    body = objects
    if plan.template is not None:
        body = _HI_TEMPLATES[plan.template].format(bg=_HI_ADJ[plan.background][2], o=objects)
    return _HI_PREFIX[plan.prefix] + body


# ---------------------------------------------------------------- short texts

_HAZARD_SHORT = {
    "en": ("a hazard sign", "a warning sign", "a danger sign", "a striped hazard symbol"),
    "zh": ("危险标志", "警告标志", "危险警示牌", "条纹危险符号"),
    "ru": ("знак опасности", "предупреждающий знак", "знак «опасно»", "полосатый символ опасности"),
    "hi": ("ख़तरे का निशान", "चेतावनी चिह्न", "ख़तरा संकेत", "धारीदार ख़तरे का प्रतीक"),
}
# The moderation concept in each language (what "a hazard sign" is in English).
HAZARD_PROMPTS = {lang: texts[0] for lang, texts in _HAZARD_SHORT.items()}


def hazard_short(language: str, index: int) -> str:
    """One of four short ways (index 0-3) to say "a hazard sign" in ``language``."""
    return _HAZARD_SHORT[language][index]


def render(plan: CaptionPlan, language: str) -> str:
    """The caption ``plan`` in a non-English ``language`` (English lives in synthetic.py)."""
    if language == "zh":
        return _zh(plan)
    if language == "ru":
        return _ru(plan)
    if language == "hi":
        return _hi(plan)
    raise ValueError(f"unknown caption language {language!r}; choose from {LANGUAGES}")


def group_text(g: GroupPlan, language: str) -> str:
    """One object group on its own, as a short caption ("两个红色圆形", "две красные звезды")."""
    return {"zh": _zh_group, "ru": _ru_group, "hi": _hi_group}[language](g)
