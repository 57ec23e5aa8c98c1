"""parse_dataset on small hand-made files and on the SST-2 sample; no model: tokens are words."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from amber.datasets.parse import DatasetError, parse_dataset

SST2 = Path(__file__).resolve().parent.parent / "data" / "sst2" / "train.jsonl"


def parse(data: bytes, filename: str = "data.jsonl", **options):
    options = {"count_tokens": lambda texts: [len(s.split()) for s in texts], "max_tokens": 50, "min_examples": 3,
               **options}
    return parse_dataset(data, filename, **options)


def rejects(data: bytes, filename: str = "data.jsonl", **options) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        parse(data, filename, **options)
    return caught.value


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def table(header: list[str], rows: list[list[str]], delimiter: str = ",") -> bytes:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerows([header, *rows])
    return out.getvalue().encode()


def pairs(n: int, separator: str = " ") -> list[dict]:
    return [{"prompt": f"Question {i}:", "completion": f"{separator}answer {i}"} for i in range(n)]


def chat(i: int, *, assistant: str | None = None) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": assistant or f"answer {i}"}]}


# --- formats ---

def test_sst2_sample_parses_unchanged_with_a_tenth_held_out():
    data = SST2.read_bytes()
    parsed = parse(data, "train.jsonl", min_examples=50)
    originals = [json.loads(line) for line in data.decode().splitlines()]
    assert parsed.format == "prompt_completion"
    assert [(r.prompt, r.completion) for r in parsed.rows] == [(o["prompt"], o["completion"]) for o in originals]
    assert [r.index for r in parsed.rows] == list(range(1, 101))
    assert (len(parsed.train), len(parsed.validation)) == (90, 10)
    assert parsed.report.duplicates == parsed.report.whitespace_corrected == parsed.report.empty_rows == []


def test_csv_quoted_fields_and_multiline_records_count_as_one_row():
    rows = [["Say hi, please:", " hi"], ["Two\nlines:", " ok"], ["Say hi, please:", " hi"], ["Last:", " done"]]
    parsed = parse(table(["prompt", "completion"], rows), "data.csv")
    assert [r.prompt for r in parsed.rows] == ["Say hi, please:", "Two\nlines:", "Last:"]
    assert parsed.report.duplicates == [3]  # the third record, though it starts on line 5 of the file


def test_tsv_and_bom():
    data = table(["prompt", "completion"], [[f"Q{i}:", f" a{i}"] for i in range(3)], delimiter="\t")
    for filename in ("data.tsv", "upload"):  # by extension, and by the header when there is none
        assert [r.completion for r in parse(b"\xef\xbb\xbf" + data, filename).rows] == [" a0", " a1", " a2"]


def test_json_content_is_read_as_jsonl_whatever_the_name():
    assert len(parse(jsonl(pairs(3)), "data.txt").rows) == 3


def test_chat_rows_keep_their_messages():
    parsed = parse(jsonl([chat(i) for i in range(4)]))
    assert parsed.format == "chat"
    assert parsed.rows[0].prompt == parsed.rows[0].completion == ""
    assert parsed.rows[0].messages == tuple(chat(0)["messages"])


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "message 1 needs a role"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "message 1 needs a string"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "only the first"),
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "last message"),
    ([], "non-empty list"),
])
def test_invalid_chat_rows_are_named(messages, problem):
    error = rejects(jsonl([chat(0), chat(1), {"messages": messages}]))
    assert error.field == "dataset_file" and "row 3" in error.message and problem in error.message


def test_chat_files_take_no_selected_columns():
    assert rejects(jsonl([chat(i) for i in range(3)]), selected_columns="a,b").field == "selected_columns"


def test_chat_and_prompt_completion_rows_do_not_mix():
    error = rejects(jsonl([chat(0), *pairs(2)]))
    assert error.message.startswith("rows 2, 3 differ in shape from row 1 (chat)")


# --- columns ---

@pytest.mark.parametrize("selected", ['{"prompt": "question", "completion": "answer"}', "question, answer",
                                      '["question", "answer"]'])
def test_selected_columns_map_file_columns(selected):
    data = table(["id", "question", "answer"], [[str(i), f"Q{i}:", f" a{i}"] for i in range(3)])
    rows = parse(data, "data.csv", selected_columns=selected).rows
    assert [(r.prompt, r.completion) for r in rows] == [("Q0:", " a0"), ("Q1:", " a1"), ("Q2:", " a2")]


def test_empty_selected_columns_means_the_default_columns():
    assert len(parse(jsonl(pairs(3)), selected_columns="").rows) == 3


@pytest.mark.parametrize("selected", ['{"prompt": "question", "completion": "nope"}', "question,nope"])
def test_unknown_selected_column_lists_the_files_columns(selected):
    data = table(["question", "answer"], [["Q:", " a"]] * 3)
    error = rejects(data, "data.csv", selected_columns=selected)
    assert error.field == "selected_columns"
    assert "'nope'" in error.message and "'question', 'answer'" in error.message


@pytest.mark.parametrize("selected", ["just-one", "a,b,c", '{"prompt": 1}', '{"answer": "x"}', "{broken"])
def test_malformed_selected_columns(selected):
    assert rejects(jsonl(pairs(3)), selected_columns=selected).field == "selected_columns"


def test_missing_columns_point_at_selected_columns():
    error = rejects(table(["question", "answer"], [["Q:", " a"]] * 3), "data.csv")
    assert error.field == "dataset_file"
    assert "'prompt'" in error.message and "selected_columns" in error.message


def test_jsonl_row_without_a_key_or_with_a_number():
    assert "row 2 has no 'completion'" in rejects(jsonl([pairs(1)[0], {"prompt": "x"}, *pairs(2)])).message
    error = rejects(jsonl([*pairs(2), {"prompt": "x", "completion": 1}]))
    assert "row 3 has a non-string 'completion'" in error.message


def test_csv_row_with_too_many_fields_is_named():
    assert "row 2 has 3 fields but the header has 2" in rejects(b"prompt,completion\nQ:, a\nQ:, a, b\n", "data.csv").message


# --- undecodable and malformed files ---

def test_non_utf8_bytes():
    error = rejects(b"prompt,completion\ncaf\xe9:, ok\n", "data.csv")
    assert error.field == "dataset_file" and "UTF-8" in error.message


def test_malformed_json_line_is_named():
    data = jsonl(pairs(2)) + b'{"prompt": "x", "completion": \n' + jsonl(pairs(2))
    assert "line 3 is not valid JSON" in rejects(data).message
    assert "line 2 is not a JSON object" in rejects(jsonl([pairs(1)[0], [1, 2], pairs(1)[0]])).message


def test_empty_file():
    assert "empty" in rejects(b"\xef\xbb\xbf\n").message


# --- empty and duplicate rows ---

def test_empty_rows_are_skipped_and_reported():
    data = jsonl(pairs(2)) + b"\n" + jsonl([{"prompt": " ", "completion": ""}, *pairs(3)[2:]])
    parsed = parse(data)
    assert parsed.report.empty_rows == [3, 4] and [r.index for r in parsed.rows] == [1, 2, 5]
    csv_data = b"prompt,completion\nQ1:, a\n\n,\n  \nQ2:, b\nQ3:, c\n"
    assert parse(csv_data, "data.csv").report.empty_rows == [2, 3, 4]


def test_half_empty_rows_are_errors():
    rows = [*pairs(2), {"prompt": "Q:", "completion": " "}, {"prompt": "", "completion": " a"}, pairs(4)[3]]
    error = rejects(jsonl(rows))
    assert error.field == "dataset_file"
    assert error.message.startswith("rows 3, 4: a row needs both a prompt and a completion")


def test_duplicates_keep_the_first():
    rows = pairs(3)
    parsed = parse(jsonl([rows[0], rows[1], rows[0], rows[2], rows[1]]))
    assert [r.index for r in parsed.rows] == [1, 2, 4] and parsed.report.duplicates == [3, 5]


# --- whitespace at the prompt/completion boundary ---

def test_consistent_separator_is_left_alone():
    rows = [{"prompt": f"Q{i}:\n", "completion": f"a{i} "} for i in range(3)]
    parsed = parse(jsonl(rows))
    assert [(r.prompt, r.completion) for r in parsed.rows] == [(r["prompt"], r["completion"]) for r in rows]
    assert parsed.report.whitespace_corrected == []


def inconsistent() -> list[dict]:
    return [*pairs(4), {"prompt": "Q5: ", "completion": "a5 "}, {"prompt": "Q6:", "completion": "a6"}]


def test_inconsistent_separator_is_rejected_without_approval():
    error = rejects(jsonl(inconsistent()))
    assert error.field == "approve_whitespace_correction"
    assert "rows 5, 6" in error.message and "approve_whitespace_correction=true" in error.message


def test_inconsistent_separator_is_corrected_to_the_majority_when_approved():
    parsed = parse(jsonl(inconsistent()), approve_whitespace_correction=True)
    assert parsed.report.whitespace_corrected == [5, 6]
    assert [(r.prompt, r.completion) for r in parsed.rows[4:]] == [("Q5:", " a5 "), ("Q6:", " a6")]
    assert [(r.prompt, r.completion) for r in parsed.rows[:4]] == [(p["prompt"], p["completion"]) for p in pairs(4)]


def test_many_differing_rows_are_cited_with_a_count():
    rows = pairs(20) + pairs(30, separator="")[20:]
    assert "but rows 21, 22, 23, 24, 25, 26, 27, 28, 29, 30 differ" in rejects(jsonl(rows)).message
    rows = pairs(20) + pairs(32, separator="")[20:]
    assert "but rows 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, ... (12 in all) differ" in rejects(jsonl(rows)).message


def test_duplicates_are_compared_after_correction():
    rows = [*pairs(3), {"prompt": "Question 0: ", "completion": "answer 0"}]
    parsed = parse(jsonl(rows), approve_whitespace_correction=True)
    assert parsed.report.whitespace_corrected == [4] and parsed.report.duplicates == [4]


# --- long rows ---

def long_rows() -> list[dict]:
    return [*pairs(3), {"prompt": "Q:" + " word" * 60, "completion": " a"}, *pairs(5)[3:]]


def test_long_rows_are_rejected_unless_deletion_is_asked_for():
    error = rejects(jsonl(long_rows()))
    assert error.field == "delete_long_rows" and "row 4" in error.message and "limit of 50 tokens" in error.message
    parsed = parse(jsonl(long_rows()), delete_long_rows=True)
    assert parsed.report.deleted_long_rows == [4] and [r.index for r in parsed.rows] == [1, 2, 3, 5, 6]


def test_chat_rows_count_every_message():
    rows = [chat(0), chat(1, assistant="word " * 48), chat(2), chat(3)]  # 48 + "Be brief." + 2 > 50
    assert parse(jsonl(rows), delete_long_rows=True).report.deleted_long_rows == [2]


# --- size and split ---

def test_too_few_examples_says_how_many_remain_and_why():
    rows = pairs(50)
    error = rejects(jsonl(rows + rows[:3] + [{"prompt": "", "completion": ""}]), min_examples=51)
    assert error.field == "dataset_file"
    assert error.message == "50 examples after removing 3 duplicates, 1 empty row; at least 51 are needed"


def test_split_is_deterministic_and_depends_on_the_file():
    first = parse(jsonl(pairs(200)), split_ratio=0.2)
    again = parse(jsonl(pairs(200)), split_ratio=0.2)
    other = parse(jsonl(pairs(200, separator="  ")), split_ratio=0.2)
    chosen = [r.index for r in first.validation]
    assert chosen == [r.index for r in again.validation] and chosen != [r.index for r in other.validation]
    assert chosen != list(range(1, 41))  # shuffled, not the head of the file


@pytest.mark.parametrize("n, ratio, validation", [(50, 0.0, 0), (50, 0.1, 5), (55, 0.1, 6), (50, 0.001, 1),
                                                  (51, 0.5, 26), (3, 0.5, 2)])
def test_split_sizes(n, ratio, validation):
    parsed = parse(jsonl(pairs(n)), split_ratio=ratio)
    assert (len(parsed.validation), len(parsed.train)) == (validation, n - validation)


@pytest.mark.parametrize("ratio", [-0.1, 0.6, float("nan")])
def test_bad_split_ratio(ratio):
    assert rejects(jsonl(pairs(3)), split_ratio=ratio).field == "split_ratio"


# --- files read in bounded memory ---

def test_a_file_object_reads_as_its_bytes_do_and_stays_open(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(SST2.read_bytes())
    with open(path, "rb") as f:
        from_file = parse(f, "data.jsonl", min_examples=50)
        assert not f.closed
    assert from_file == parse(SST2.read_bytes(), "data.jsonl", min_examples=50)


@pytest.mark.parametrize("data, filename", [
    (jsonl(pairs(5)), "data.jsonl"),
    (b"\n".join([b"prompt,completion", *[f"Q{i}:, a{i}".encode() for i in range(5)]]), "data.csv"),
    (jsonl(pairs(3)) + b"\n\n\n", "data.jsonl"),  # blank rows count toward the cap
])
def test_more_rows_than_the_cap_are_refused_naming_the_file(data, filename):
    error = rejects(data, filename, max_rows=4)
    assert error.field == "dataset_file" and "more than 4 rows" in error.message


def test_the_cap_is_on_rows_not_on_trailing_blanks():
    assert len(parse(jsonl(pairs(4)) + b"   ", max_rows=4).rows) == 4


def test_a_bad_byte_is_named_by_its_offset_in_the_file_whatever_the_chunks(monkeypatch):
    import amber.datasets.parse as module

    data = b"\xef\xbb\xbf" + jsonl(pairs(3)) + "é".encode() + b"\xff" + b"tail"
    offset = data.index(b"\xff")
    for chunk in (1, 2, 3, 5, 1 << 20):  # "é" and the BOM split across chunks, or not
        monkeypatch.setattr(module, "_CHUNK", chunk)
        assert f"bad byte at offset {offset})" in rejects(data).message


def test_kind_and_bom_are_read_across_chunks(monkeypatch):
    import amber.datasets.parse as module

    monkeypatch.setattr(module, "_CHUNK", 4)
    data = b"\xef\xbb\xbf" + table(["prompt", "completion"], [[f"Q{i}:", f" a{i}"] for i in range(3)], "\t")
    assert [r.completion for r in parse(data, "upload").rows] == [" a0", " a1", " a2"]
    assert parse(b"  \n" + jsonl(pairs(3)), "upload").kind == "jsonl"


def test_lines_end_at_newline_only_and_crlf_is_fine():
    rows = [{"prompt": "a\u2028b:", "completion": " c"}, *pairs(2)]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode()
    assert [r.prompt for r in parse(data).rows] == ["a\u2028b:", "Question 0:", "Question 1:"]


def test_long_rows_are_found_in_every_batch_of_token_counts():
    rows, long = pairs(2500), [1, 1024, 1025, 2500]
    for i in long:
        rows[i - 1] = {"prompt": f"Question {i}:" + " w" * 60, "completion": " answer"}
    asked = []

    def count(texts):
        asked.append(len(texts))
        return [len(s.split()) for s in texts]

    parsed = parse(jsonl(rows), delete_long_rows=True, count_tokens=count)
    assert parsed.report.deleted_long_rows == long and len(parsed.rows) == 2496
    assert asked == [1024, 1024, 452]
