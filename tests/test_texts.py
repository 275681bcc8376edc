"""One reader of user-given texts (saelab.texts): plain files, JSON lines, and their errors."""

import pytest

from saelab.texts import parse_texts, read_texts


def test_plain_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n  \ntwo\n")
    (tmp_path / "b.jsonl").write_text('"one"\n{"text": "two"}\n\n{"prompt": "three"}\n')
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two", "three"]


@pytest.mark.parametrize("line, match", [("{oops", "bad.jsonl:1: not valid JSON"), ("3", "bad.jsonl:1: expected"),
                                         ('{"txt": "a"}', "'text'")])
def test_bad_lines_name_the_file_and_line(tmp_path, line, match):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        read_texts(tmp_path / "bad.jsonl")


def test_missing_file_and_streams():
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file of texts"):
        read_texts("nope.txt")
    assert list(parse_texts(['"a"', "", '{"text": "b"}', '{"text": ""}'])) == ["a", "b", ""]   # an empty text is a text
    with pytest.raises(ValueError, match="input:2: not valid JSON"):
        list(parse_texts(['"a"', "{"]))
