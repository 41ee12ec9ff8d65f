"""Quality rules: each rule drops the document built to break it, and only for that reason."""

import pytest

from pyllm.data.filters import QualityConfig, measure, ngram_char_fractions, quality_check

PROSE = ("The history of the language shows that it was designed to be readable, and that the people who "
         "have worked on it care about clear code with a small core. Each release adds features to the "
         "standard library and improves the speed of the interpreter, which matters to the many users who "
         "depend on it for scripts, science and the web. ")


NOUNS = ("river stone cloud garden window letter bridge forest candle mirror engine harbor orchard "
         "lantern meadow violin").split()
VARIED = " ".join(f"The {a} near {b} was seen with {c} and {d}." for a, b, c, d in
                  zip(NOUNS, NOUNS[1:] + NOUNS[:1], NOUNS[5:] + NOUNS[:5], NOUNS[9:] + NOUNS[:9]))


def _words(n, start=0):
    return " ".join(f"w{start + i}x" for i in range(n))


# each case: text that breaks exactly the named rule (earlier rules pass)
CASES = {
    "min_words": "the cat and the dog",
    "max_words": PROSE + _words(300),
    "min_mean_word_length": PROSE + " ".join(["a"] * 400),
    "max_mean_word_length": PROSE + " " + " ".join(f"averyveryverylongidentifier{i}" for i in range(200)),
    "max_symbol_word_ratio": PROSE + " #" * 40,
    "max_bullet_line_fraction": "\n".join(f"- the item {i} of that list with words" for i in range(30)),
    "max_ellipsis_line_fraction": "\n".join(f"the line {i} of that text trails off and..." for i in range(30)),
    "min_alpha_word_fraction": PROSE + " " + " ".join(str(i) for i in range(200)),
    "min_stop_words": " ".join(f"alpha{i} beta{i} gamma{i}" for i in range(20)),
    "max_dup_line_fraction": PROSE + "\n" + "\n".join(["short repeated"] * 60),
    "max_dup_paragraph_fraction": "\n\n".join(
        [PROSE] + [f"{a} {b} with {c}" for a, b, c in zip(NOUNS, NOUNS[3:], NOUNS[6:])] + ["the same paragraph"] * 8),
    "max_top_ngram_char_fraction_2": PROSE + " " + "hello world " * 120,
    "max_dup_ngram_char_fraction_5": PROSE + " " + PROSE + " " + PROSE,
    "lorem_ipsum": PROSE + " Lorem ipsum dolor sit amet.",
    "min_punct_line_fraction": "\n".join(f"the menu entry {NOUNS[i]} and the {NOUNS[-i - 1]} link" for i in range(12)),
    "max_short_line_fraction": PROSE + "\n" + "\n".join(f"tag {n}" for n in NOUNS),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_rule_drops_its_case(rule):
    cfg = QualityConfig(max_words=250 if rule == "max_words" else 200_000,
                        max_dup_line_fraction=0.45 if rule == "max_dup_line_fraction" else None,
                        max_dup_line_char_fraction=None,
                        min_punct_line_fraction=0.12 if rule == "min_punct_line_fraction" else None,
                        max_short_line_fraction=0.67 if rule == "max_short_line_fraction" else None)
    assert quality_check(CASES[rule], cfg) == rule
    if rule != "min_words":  # the rule off -> the document survives that rule (another may catch it)
        off = QualityConfig(**{**cfg.__dict__, **_turn_off(rule)})
        assert quality_check(CASES[rule], off) != rule


def _turn_off(rule):
    if rule.startswith("max_top_ngram"):
        return {"max_top_ngram_char_fraction": {}}
    if rule.startswith("max_dup_ngram"):
        return {"max_dup_ngram_char_fraction": {}}
    if rule == "lorem_ipsum":
        return {"drop_lorem_ipsum": False}
    return {rule: None}


def test_good_prose_passes_default_and_gopher():
    text = PROSE + " " + VARIED
    assert quality_check(text, QualityConfig()) is None
    assert quality_check(text, QualityConfig.gopher()) is None
    assert quality_check(text, QualityConfig.fineweb()) is None


def test_ngram_fractions_match_definition():
    words = "a b c a b c x".split()
    stats = ngram_char_fractions(words, top_ns=[2], dup_ns=[3])
    # most common bigram "a b" (and "b c") occurs twice: 2 chars * 2 / 7 chars
    assert stats["top_ngram_2"] == pytest.approx(4 / 7)
    # "a b c" repeats: it covers words 0..5 -> 6 of 7 characters
    assert stats["dup_ngram_3"] == pytest.approx(6 / 7)
    assert measure("one two", QualityConfig())["dup_ngram_5"] == 0.0


@pytest.mark.parametrize("bad", [{"min_words": -1}, {"max_dup_ngram_char_fraction": {5: 1.5}},
                                 {"min_words": 10, "max_words": 5}])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="quality"):
        QualityConfig(**bad)
