"""The row filters on a realistic generated set with planted faults: each fault is caught with
its reason code, and no clean row is dropped."""
import json
from pathlib import Path

import pytest

from amber.datagen.filters import REASONS, Candidate, FilterSettings, filter_rows, majority

SST2 = Path(__file__).parents[1] / "data" / "sst2" / "train.jsonl"


def reviews() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in SST2.read_text().splitlines()]
    return [(r["prompt"].split("\n")[0].removeprefix("Review: "), r["completion"].strip())
            for r in rows]


def clean_label_rows(n: int = 40) -> list[Candidate]:
    """Inputs mode: real reviews, labels in varied spellings (as a general model writes them)."""
    spell = {"positive": ["positive", "Positive", " positive\n"], "negative": ["negative", "Negative."]}
    return [Candidate(i, text, spell[label][i % len(spell[label])], "stop" if i % 2 else "endoftext")
            for i, (text, label) in enumerate(reviews()[:n], 1)]


TOPICS = ["a sourdough starter", "the water cycle", "compound interest", "a bicycle chain",
          "photosynthesis", "the French revolution", "binary search", "a sourdough loaf's crust",
          "volcanoes", "jazz improvisation", "tax brackets", "the immune system", "chess openings",
          "solar panels", "tides", "vaccines", "coffee roasting", "black holes", "recycling plastic",
          "the printing press"]


def clean_examples(n: int = 40) -> list[Candidate]:
    """Examples mode: open-ended rows the model wrote in full (real reviews as the outputs)."""
    long_reviews = [text for text, _ in reviews() if len(text.split()) >= 12]
    return [Candidate(i, f"Write a review of a film about {TOPICS[(i - 1) % 20]}.",
                      long_reviews[i - 1], "stop") for i in range(1, n + 1)]


def by_index(verdicts):
    return {v.index: v for v in verdicts}


def test_clean_label_rows_all_kept_and_labels_repeat_legitimately():
    verdicts = filter_rows(clean_label_rows(), seeds=[], mode="inputs")
    assert [v.index for v in verdicts] == list(range(1, 41))
    assert all(v.kept and v.reasons == () and v.details == () for v in verdicts), \
        [(v.index, v.details) for v in verdicts if not v.kept]
    assert all(v.confidence is None for v in verdicts)


def test_clean_examples_all_kept():
    verdicts = filter_rows(clean_examples(), seeds=[], mode="examples")
    assert all(v.kept for v in verdicts), [(v.index, v.details) for v in verdicts if not v.kept]


def planted_label_set():
    rows = clean_label_rows()
    text = {r.index: r.input for r in rows}
    seed = (reviews()[60][0], reviews()[60][1])
    extra = [
        (text[3], rows[2].output.upper(), "stop"),                                   # 41 duplicate of 3
        (text[5].replace(" .", " !"), rows[4].output, "stop"),          # 42 punctuation changed
        (text[7].replace("the", "a", 1), rows[6].output, "stop"),       # 43 one word changed
        (seed[0], seed[1], "stop"),                                      # 44 seed copy
        ("a fine film", "   ", "stop"),                                  # 45 empty
        ("an endless film", "the film is long and it goes on and on and", "length"),  # 46 truncated
        ("a film", "the " * 30, "stop"),                                 # 47 repetitive token
        ("a play", "It was good.\nIt was good.\nIt was good.\nIt was good.", "stop"),  # 48 lines
        ("the cast is strong and the script sharp", "the cast is strong and the script sharp",
         "stop"),                                                        # 49 copies input
        ("the movie", "positive because " + " ".join(f"w{k}" for k in range(60)), "stop"),  # 50
        ("what a fucking waste of two hours", "negative", "stop"),      # 51 profane input
        ("a sweet little film", "positive, holy sh1t", "stop"),         # 52 profane output
    ]
    rows += [Candidate(41 + k, i, o, f) for k, (i, o, f) in enumerate(extra)]
    rows.append(Candidate(53, "a film of some kind", "positive", "stop",
                          samples=("positive", "negative", "neutral")))  # 53 low agreement
    rows.append(Candidate(54, "a lovely film", "positive", "stop",
                          samples=("Positive", "positive ", "negative")))  # 54 agreement 2/3
    return rows, [seed]


def test_planted_faults_caught_with_their_reasons_and_clean_rows_kept():
    rows, seeds = planted_label_set()
    v = by_index(filter_rows(rows, seeds, mode="inputs"))
    assert all(v[i].kept for i in range(1, 41)), [(i, v[i].details) for i in range(1, 41) if not v[i].kept]
    expected = {41: "duplicate", 42: "near_duplicate", 43: "near_duplicate", 44: "seed_duplicate",
                45: "empty", 46: "truncated", 47: "repetitive", 48: "repetitive",
                49: "copies_input", 50: "length_outlier", 51: "profane", 52: "profane",
                53: "low_agreement"}
    for i, reason in expected.items():
        assert reason in v[i].reasons, (i, v[i].reasons, v[i].details)
        assert not v[i].kept and len(v[i].details) == len(v[i].reasons)
        assert set(v[i].reasons) <= set(REASONS)
    assert v[41].details == ("duplicate of row 3",)
    assert v[42].details[0].startswith("near duplicate of row 5 (similarity 1.00")
    assert v[43].details[0].startswith("near duplicate of row 7 (similarity 0.9")
    assert v[44].details == ("repeats seed example 1",)
    assert "input" in v[51].details[0] and "output" in v[52].details[0]
    assert v[53].confidence == pytest.approx(1 / 3)
    assert v[54].kept and v[54].confidence == pytest.approx(2 / 3)


def test_duplicates_judged_against_kept_rows_only():
    a = Candidate(1, "a warm film", "positive", "length")   # dropped: truncated
    rows = [a, Candidate(2, a.input, a.output, "stop"), Candidate(3, a.input, "Positive", "stop")]
    v = by_index(filter_rows(rows, []))
    assert v[1].reasons == ("truncated",)
    assert v[2].kept                                         # the copy of a dropped row stays
    assert v[3].details == ("duplicate of row 2",)


def test_same_input_other_output_is_not_a_duplicate_in_inputs_mode():
    rows = [Candidate(1, "a warm , funny film", "positive", "stop"),
            Candidate(2, "a cold , dull film", "positive", "stop"),
            Candidate(3, "a warm , funny film", "a warm and funny comedy that delights", "stop")]
    assert all(v.kept for v in filter_rows(rows, []))


def test_label_inside_review_is_not_copies_input():
    rows = [Candidate(1, "the reviews were positive , and so am i", "positive", "stop"),
            Candidate(2, "negative", "negative", "stop")]                # the whole input
    v = by_index(filter_rows(rows, []))
    assert v[1].kept
    assert v[2].reasons == ("copies_input",)


def test_long_output_contained_in_input_copies_it():
    text = "the plot is thin but the actors make every scene count and the ending lands"
    v = filter_rows([Candidate(1, text, "the actors make every scene count", "stop")], [],
                    mode="examples")
    assert v[0].reasons == ("copies_input",) and "contained" in v[0].details[0]


def test_one_word_labels_have_no_length_outliers():
    rows = [Candidate(i, f"review number {i}", "positive" if i % 3 else "negative", "stop")
            for i in range(1, 31)]
    rows.append(Candidate(31, "review 31", "very positive indeed", "stop"))
    assert all(v.kept for v in filter_rows(rows, []))


def test_length_outlier_needs_enough_rows():
    rows = [Candidate(i, f"review {i}", "positive", "stop") for i in range(1, 9)]
    rows.append(Candidate(9, "review 9", "word " * 50, "stop"))
    assert "length_outlier" not in filter_rows(rows, [])[-1].reasons
    assert "length_outlier" in filter_rows(rows, [], FilterSettings(length_min_rows=5))[-1].reasons


def test_examples_mode_faults():
    rows = clean_examples()
    rows += [Candidate(41, "", "An answer with no question to it.", "stop"),           # empty input
             Candidate(42, rows[0].input, rows[0].output.replace(" the ", " a ", 1), "stop"),
             Candidate(43, "Explain tides.", "Tides are tides are tides are tides are tides "
                                             "are tides are tides are tides.", "stop")]
    seeds = [(rows[1].input + " ", rows[1].output)]
    v = by_index(filter_rows(rows, seeds, mode="examples"))
    assert v[2].reasons == ("seed_duplicate",)
    assert all(v[i].kept for i in range(3, 41))
    assert v[41].reasons == ("empty",) and v[41].details == ("empty input",)
    assert v[42].reasons == ("near_duplicate",) and "of row 1 " in v[42].details[0]
    assert "repetitive" in v[43].reasons


def test_seed_near_duplicate_detail():
    seed = ("Explain rainbows to a ten-year-old.", "Light bends in raindrops and splits into colours.")
    row = Candidate(1, "Explain rainbows to a ten year old!", seed[1], "stop")
    assert filter_rows([row], [seed], mode="examples")[0].details[0].startswith(
        "near duplicate of seed example 1 (similarity")


def test_several_reasons_in_canonical_order():
    row = Candidate(1, "a film", "shit " * 20, "length")
    v = filter_rows([row], [])[0]
    assert v.reasons == ("truncated", "repetitive", "profane") and not v.kept


def test_ordinary_words_of_the_list_are_not_profane():
    rows = [Candidate(1, "a gay romance set in hell , with a stupid , ugly villain", "positive", "stop")]
    assert filter_rows(rows, [])[0].kept
    strict = FilterSettings(profanity_allowed=frozenset())
    assert filter_rows(rows, [], strict)[0].reasons == ("profane",)


def test_majority_normalises_and_breaks_ties_by_first_seen():
    assert majority(["Positive ", "positive", "negative"]) == ("Positive", pytest.approx(2 / 3))
    assert majority(["a  b", "A B", "c", "c"]) == ("a  b", 0.5)
    assert majority(["negative", "positive"]) == ("negative", 0.5)
    assert majority(["x"]) == ("x", 1.0)
    with pytest.raises(ValueError):
        majority([])


def test_unknown_mode_rejected():
    with pytest.raises(ValueError):
        filter_rows([], [], mode="both")
