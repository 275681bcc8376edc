"""The offline explainer names the shared theme of a feature's contexts; map clusters are named by content words."""

from saelab.explain import Example, FeatureRecord, OfflineJudge, detection_score, offline_explanation, parse_explanation
from saelab.themes import content_words, context_theme, word_rates
from saelab.fmap import cluster_names, explanation_terms


def window(text: str, fire: str | None, act: float = 2.0) -> Example:
    """Word-level tokens of ``text``; the feature fires (``act``) on each token equal to ``fire``."""
    tokens = [w if i == 0 else " " + w for i, w in enumerate(text.split())]
    return Example(tokens, [act if fire is not None and t.strip() == fire else 0.0 for t in tokens])


COLOURS = ["the Golden sunset turned the sky yellow and orange", "a Golden ring of yellow gold on her hand",
           "paint it Golden like the yellow gold of ripe wheat", "his Golden hair shone yellow in the light",
           "a Golden crown, bright yellow gold and jewels", "the Golden leaves fall, yellow and red in autumn"]
CORPUS = ["the train was late and the station was full", "she wrote a letter to her brother in the city",
          "the market sells bread and fish every morning", "he fixed the bike with a new chain and a light",
          "they walked along the river until the sun set", "a report on the weather in the hills",
          "the light in the kitchen was left on all night", "we read the news and drank coffee",
          "the dog slept by the door in the afternoon", "a red car stopped at the corner of the street"]


def golden_record() -> FeatureRecord:
    top = tuple(window(t, "Golden") for t in COLOURS)
    return FeatureRecord(id=7, density=0.01, max_act=2.0, top=top, random=tuple(window(t, None) for t in CORPUS))


def test_content_words_leave_out_function_words():
    assert content_words([" of", " the", " yellow", " Golden", " it", " sky"]) == {"yellow", "golden", "sky"}
    assert content_words(["<|endoftext|>", "x", "<|im_start|>", "user", " hello<|im_end|>"]) == {"user", "hello"}


def test_the_theme_is_what_the_contexts_share_and_the_corpus_does_not():
    record = golden_record()
    background = word_rates(record.random)
    theme = context_theme(record.top, background, exclude={"golden"})
    assert theme[:2] == ["yellow", "gold"]             # in 6 and 3 of 6 windows
    assert "golden" not in theme and "the" not in theme
    # "light" is in one colour window and two corpus windows: not over-represented
    assert "light" not in theme


def test_a_word_common_in_the_corpus_is_no_theme():
    record = golden_record()
    corpus_of_yellow = tuple(window(t + " yellow", None) for t in CORPUS)
    assert "yellow" not in context_theme(record.top, word_rates(corpus_of_yellow), exclude={"golden"})


def test_offline_explanation_names_the_theme_and_the_score_does_not_change():
    record = golden_record()
    text = offline_explanation(record, word_rates(record.random))
    plain = offline_explanation(record)
    assert "fires on ` Golden` (100%)" in text and "; in contexts about yellow" in text
    # the theme is words, not backticked tokens: the judge reads the same tokens, patterns and left context
    assert parse_explanation(text) == parse_explanation(plain.split("; in contexts about")[0])
    pos = [window("a Golden field of yellow corn", "Golden")]
    neg = [window("the train was late", None)]
    assert detection_score(text, pos, neg, OfflineJudge()) == detection_score(plain, pos, neg, OfflineJudge()) == 1.0


def test_too_few_windows_or_no_corpus_have_no_theme():
    background = word_rates(golden_record().random)
    assert context_theme([window(COLOURS[0], "Golden"), window(COLOURS[1], "Golden")] * 3, background) == []
    assert context_theme(golden_record().top, None) == []


def test_map_clusters_are_named_by_content_words_not_function_words():
    assert explanation_terms("fires on ` of` (60%), ` the` (30%); in contexts about bridge, fog") == {"bridge", "fog"}
    clusters = [0, 0, 0, 1, 1]
    texts = ["fires on ` of` (50%), ` Gate` (40%)", "fires on ` the` (50%), ` Gate` (30%)",
             "fires on ` of` (70%); in contexts about bridge", "fires on ` self` (90%)", "fires on ` self` after `(`"]
    names = cluster_names(clusters, texts, n_terms=2)
    assert names[0] == "` Gate` · bridge" and "of" not in names[0] and "the" not in names[0]
    assert names[1].startswith("` self`")
