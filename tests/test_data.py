"""Tests for potluck.data: reading, the one-line errors, checks, splitting and writing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from potluck.data import (
    DataError,
    LabelledData,
    check_known_labels,
    check_training_data,
    read_data,
    read_texts,
)
from potluck.errors import UserError
from potluck.splits import stratified_split
from potluck.tables import write_rows


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def error_of(path: Path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_data(path, **kwargs)
    return info.value


def assert_one_line(err: DataError, name: str, line: int | None) -> str:
    text = str(err)
    assert "\n" not in text and "\r" not in text
    assert name in text
    if line is not None:
        assert text.startswith(f"{err.path}:{line}:"), text
        assert err.line == line
    assert err.hint, "every DataError says what to do"
    return text


# ---------------------------------------------------------------- reading


def test_reads_csv_with_quoted_multiline_field(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\n"hello, world",pos\n"two\nlines",neg\nplain,pos\n')
    data = read_data(path)
    assert data.texts == ["hello, world", "two\nlines", "plain"]
    assert data.labels == ["pos", "neg", "pos"]
    assert data.lines == [2, 3, 5]
    assert data.path == str(path)
    assert len(data) == 3


def test_reads_tsv_jsonl_parquet_and_txt(tmp_path):
    tsv = read_data(write(tmp_path / "a.tsv", "label\ttext\npos\tgood\nneg\tbad\n"))
    assert (tsv.texts, tsv.labels) == (["good", "bad"], ["pos", "neg"])
    jsonl = read_data(write(tmp_path / "a.ndjson", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n'))
    assert (jsonl.texts, jsonl.labels, jsonl.lines) == (["a", "b"], ["x", "y"], [1, 3])
    txt = read_texts(write(tmp_path / "a.txt", "first\n\n  \nsecond\r\n"))
    assert (txt.texts, txt.labels, txt.lines) == (["first", "second"], None, [1, 4])


def test_bom_crlf_and_header_whitespace_are_accepted(tmp_path):
    path = write(tmp_path / "win.csv", b"\xef\xbb\xbftext , label\r\nhi,a\r\nyo,b\r\n")
    data = read_data(path)
    assert (data.texts, data.labels) == (["hi", "yo"], ["a", "b"])


def test_jsonl_labels_become_strings(tmp_path):
    lines = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": True},
             {"text": "d", "label": 2.0}, {"text": "e", "label": " spaced "}]
    data = read_data(write(tmp_path / "ints.jsonl", "".join(json.dumps(x) + "\n" for x in lines)))
    assert data.labels == ["0", "1", "true", "2", "spaced"]


def test_texts_kept_as_written(tmp_path):
    data = read_data(write(tmp_path / "t.jsonl", '{"text": "  padded  ", "label": "a"}\n'))
    assert data.texts == ["  padded  "]


def test_labels_optional_when_not_required(tmp_path):
    path = write(tmp_path / "unl.csv", "text,other\nhello,1\n")
    assert read_data(path, require_labels=False).labels is None
    assert read_texts(path).labels is None
    labelled = write(tmp_path / "lab.csv", "text,label\nhello,a\n")
    assert read_data(labelled, label_column=None).labels is None
    assert read_data(labelled, require_labels=False).labels == ["a"]
    assert read_texts(labelled).labels is None


def test_custom_columns(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"sentence": "x", "intent": "a"}\n')
    data = read_data(path, text_column="sentence", label_column="intent")
    assert (data.texts, data.labels) == (["x"], ["a"])


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_write_rows_round_trip(tmp_path, suffix):
    rows = [{"text": 'say "hi", ok', "label": "pos"}, {"text": "tab\there\nnewline", "label": "neg"},
            {"text": "ünïcødé ✓", "label": "pos"}]
    path = tmp_path / "out" / f"rows{suffix}"
    write_rows(path, rows)
    data = read_data(path)
    assert data.texts == [r["text"] for r in rows]
    assert data.labels == [r["label"] for r in rows]
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary files left behind"


def test_write_rows_overwrites_and_writes_json_in_csv(tmp_path):
    path = tmp_path / "p.csv"
    write_rows(path, [{"text": "old", "label": "x"}])
    write_rows(path, [{"text": "new", "label": "y", "probs": {"y": 0.9}}])
    assert path.read_text(encoding="utf-8") == 'text,label,probs\nnew,y,"{""y"": 0.9}"\n'


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_write_rows_accepts_numpy_values(tmp_path, suffix):
    np = pytest.importorskip("numpy")
    path = tmp_path / f"pred{suffix}"
    write_rows(path, [{"text": "a", "label": np.int64(3), "score": np.float32(0.5), "probs": np.array([0.5])}])
    data = read_data(path)
    assert (data.texts, data.labels) == (["a"], ["3"])


def test_csv_skips_blank_and_empty_rows_and_rejects_repeated_header(tmp_path):
    data = read_data(write(tmp_path / "b.csv", "\ntext,label\n\na,x\n,\nb,y\n"))
    assert (data.texts, data.lines) == (["a", "b"], [4, 6])
    err = error_of(write(tmp_path / "r.csv", "text,text,label\na,b,c\n"))
    assert "twice" in assert_one_line(err, "r.csv", 1)


def test_write_rows_explicit_format_and_bad_suffix(tmp_path):
    write_rows(tmp_path / "out.data", [{"text": "a", "label": "b"}], fmt="jsonl")
    assert json.loads((tmp_path / "out.data").read_text()) == {"text": "a", "label": "b"}
    with pytest.raises(DataError, match=r"out\.xlsx.*\.csv"):
        write_rows(tmp_path / "out.xlsx", [{"text": "a"}])


# ---------------------------------------------------------------- errors


def test_data_error_format_and_pickle():
    err = DataError("bad thing", path="x.csv", line=3, column=2, hint="Fix it")
    assert str(err) == "x.csv:3:2: bad thing. Fix it"
    assert isinstance(err, ValueError) and isinstance(err, UserError)
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.path, again.line, again.column, again.hint) == (str(err), "x.csv", 3, 2, "Fix it")
    assert str(DataError("multi\nline", path="f.jsonl", column="text")) == "f.jsonl: multi line"
    assert str(DataError("no path", line=4, column=2)) == "line 4:2: no path"
    assert str(DataError("nothing.", hint="Do this")) == "nothing. Do this"


def test_missing_file(tmp_path):
    text = assert_one_line(error_of(tmp_path / "nope.csv"), "nope.csv", None)
    assert "no such file" in text and "Check the path" in text


def test_directory(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    assert "folder" in assert_one_line(error_of(tmp_path / "folder.csv"), "folder.csv", None)


def test_unknown_suffix(tmp_path):
    text = assert_one_line(error_of(write(tmp_path / "data.xlsx", "x")), "data.xlsx", None)
    assert ".csv" in text and ".jsonl" in text and ".parquet" in text


def test_txt_needs_require_labels_false(tmp_path):
    text = assert_one_line(error_of(write(tmp_path / "t.txt", "hello\n")), "t.txt", None)
    assert "without labels" in text


@pytest.mark.parametrize("content", ["", "\n  \n", "\ufeff"])
def test_empty_file(tmp_path, content):
    assert "empty" in assert_one_line(error_of(write(tmp_path / "e.jsonl", content)), "e.jsonl", None)


def test_header_only_csv(tmp_path):
    assert "no examples" in assert_one_line(error_of(write(tmp_path / "h.csv", "text,label\n")), "h.csv", None)


def test_missing_text_column_csv(tmp_path):
    err = error_of(write(tmp_path / "cols.csv", "sentence,label\nhi,a\n"))
    text = assert_one_line(err, "cols.csv", 1)
    assert "'sentence'" in text and "--text-column" in text


def test_missing_label_column_jsonl_suggests_close_name(tmp_path):
    err = error_of(write(tmp_path / "l.jsonl", '{"text": "a", "labels": "x"}\n'))
    text = assert_one_line(err, "l.jsonl", 1)
    assert "'labels'" in text and "--label-column" in text and "Did you mean" in text


def test_field_missing_on_a_later_jsonl_line(tmp_path):
    err = error_of(write(tmp_path / "later.jsonl", '{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n'))
    assert_one_line(err, "later.jsonl", 2)
    assert err.column is None or err.column == "text"


def test_empty_text_csv_names_line_and_column(tmp_path):
    err = error_of(write(tmp_path / "e.csv", 'label,text\na,ok\nb,"   "\n'))
    text = assert_one_line(err, "e.csv", 3)
    assert text.startswith(f"{err.path}:3:2:") and "empty text" in text


@pytest.mark.parametrize("value", ["42", "null", '["a"]', "true"])
def test_non_text_value_jsonl(tmp_path, value):
    path = write(tmp_path / "v.jsonl", f'{{"text": "ok", "label": "a"}}\n{{"text": {value}, "label": "a"}}\n')
    err = error_of(path)
    text = assert_one_line(err, "v.jsonl", 2)
    assert err.column == "text" and "'text'" in text


def test_empty_label(tmp_path):
    err = error_of(write(tmp_path / "lab.csv", "text,label\na,x\nb,\n"))
    assert "empty label" in assert_one_line(err, "lab.csv", 3)
    err = error_of(write(tmp_path / "lab.jsonl", '{"text": "a", "label": null}\n'))
    assert "empty label" in assert_one_line(err, "lab.jsonl", 1)


def test_non_text_label_jsonl(tmp_path):
    err = error_of(write(tmp_path / "nl.jsonl", '{"text": "a", "label": ["x"]}\n'))
    assert err.column == "label"
    assert_one_line(err, "nl.jsonl", 1)


def test_not_utf8_names_line_column_and_byte(tmp_path):
    path = write(tmp_path / "latin.csv", b"text,label\nok,a\ncaf\xe9 au lait,b\n")
    err = error_of(path)
    text = assert_one_line(err, "latin.csv", 3)
    assert text.startswith(f"{err.path}:3:4:") and "0xe9" in text and "UTF-8" in text


def test_not_utf8_after_multibyte_chars_counts_characters(tmp_path):
    err = error_of(write(tmp_path / "u.jsonl", '{"text": "é'.encode() + b"\xff" + b'"}\n'))
    assert (err.line, err.column) == (1, 12)


def test_utf16_file(tmp_path):
    err = error_of(write(tmp_path / "w.csv", "text,label\nhi,a\n".encode("utf-16")))
    assert "UTF-16" in assert_one_line(err, "w.csv", 1)


def test_malformed_json_line_and_column(tmp_path):
    err = error_of(write(tmp_path / "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": }\n'))
    text = assert_one_line(err, "bad.jsonl", 2)
    assert text.startswith(f"{err.path}:2:24:") and "malformed JSON" in text


def test_jsonl_line_not_an_object(tmp_path):
    err = error_of(write(tmp_path / "arr.jsonl", '{"text": "a", "label": "x"}\n\n["b", "y"]\n'))
    assert "not a JSON object" in assert_one_line(err, "arr.jsonl", 3)


def test_csv_wrong_number_of_fields_after_multiline_record(tmp_path):
    err = error_of(write(tmp_path / "n.csv", 'text,label\n"a\nb\nc",x\nd,y,extra\n'))
    text = assert_one_line(err, "n.csv", 5)
    assert "3 fields" in text and "2" in text


def test_csv_unclosed_quote_names_the_opening_line(tmp_path):
    err = error_of(write(tmp_path / "q.csv", 'text,label\nfine,a\n"never closed,b\nmore,c\n'))
    assert "never closed" in assert_one_line(err, "q.csv", 3)


def test_csv_stray_quote(tmp_path):
    err = error_of(write(tmp_path / "s.csv", 'text,label\nfine,a\n"quoted" tail,b\n'))
    assert "malformed CSV" in assert_one_line(err, "s.csv", 3)


def test_unreadable_parquet(tmp_path):
    err = error_of(write(tmp_path / "broken.parquet", b"PAR1 this is not parquet"))
    assert "Parquet" in assert_one_line(err, "broken.parquet", None)


def test_parquet_missing_column_and_null_text(tmp_path):
    path = tmp_path / "p.parquet"
    write_rows(path, [{"body": "a", "label": "x"}])
    assert "'body'" in assert_one_line(error_of(path), "p.parquet", None)
    write_rows(path, [{"text": "a", "label": 1}, {"text": None, "label": 2}])
    err = error_of(path)
    assert (err.line, err.column) == (2, "text")
    assert_one_line(err, "p.parquet", 2)
    write_rows(path, [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    assert read_data(path).labels == ["1", "2"]


# ---------------------------------------------------------------- data and checks


def labelled(texts, labels, path="train.csv") -> LabelledData:
    return LabelledData(list(texts), list(labels), path, list(range(2, len(texts) + 2)))


def test_fingerprint_stable_and_order_sensitive():
    a = labelled(["x", "y"], ["1", "2"])
    assert a.fingerprint() == labelled(["x", "y"], ["1", "2"], path="other.csv").fingerprint()
    assert len(a.fingerprint()) == 64
    assert a.fingerprint() != labelled(["y", "x"], ["2", "1"]).fingerprint()
    assert a.fingerprint() != labelled(["x", "y"], ["2", "1"]).fingerprint()
    assert a.fingerprint() != LabelledData(["x", "y"], None).fingerprint()
    # a fixed value: the fingerprint must not change between runs or versions without intent
    expected = "34cfc66c8eb2ea1d22539bec742b67dbaabc5261acee094f5e7775f805a3811c"
    assert LabelledData(["a", "é"], ["b", "c"]).fingerprint() == expected


def test_label_counts():
    assert labelled("abcd", ["y", "x", "y", "y"]).label_counts() == {"x": 1, "y": 3}
    assert LabelledData(["a"], None).label_counts() == {}


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError):
        LabelledData(["a", "b"], ["x"])


def test_single_class_is_an_error():
    err = pytest.raises(DataError, check_training_data, labelled("abc", "xxx")).value
    text = assert_one_line(err, "train.csv", None)
    assert "only one class 'x'" in text and "two labels" in text


def test_unseen_valid_label_names_the_line():
    train = labelled("abcd", ["x", "y", "x", "y"])
    valid = labelled("ef", ["x", "z"], path="valid.csv")
    err = pytest.raises(DataError, check_training_data, train, valid, min_per_class=1).value
    assert "'z'" in assert_one_line(err, "valid.csv", 3)


def test_tiny_class_and_conflict_and_duplicate_warnings(caplog):
    texts = ["same"] + [f"t{i}" for i in range(10)] + ["same", "dup", "dup", "t0"]
    labels = ["a"] + ["a"] * 10 + ["b", "a", "a", "a"]
    with caplog.at_level("WARNING", logger="potluck.data"):
        warnings = check_training_data(labelled(texts, labels), min_per_class=8)
    tiny = [w for w in warnings if "1 of 2 classes have fewer than 8 examples ('b' 1)" in w]
    conflict = [w for w in warnings if "conflicting" in w]
    assert tiny and conflict and "lines 2 and 13" in conflict[0]
    assert any("2 example(s) are exact duplicates" in w for w in warnings)
    assert len(caplog.records) == len(warnings)
    assert all("\n" not in w for w in warnings)


def test_clean_data_gives_no_warnings():
    texts = [f"t{i}" for i in range(20)]
    assert check_training_data(labelled(texts, ["a", "b"] * 10), labelled(["v"], ["a"])) == []


def test_leak_between_train_and_valid_warns():
    train = labelled([f"t{i}" for i in range(20)], ["a", "b"] * 10)
    warnings = check_training_data(train, labelled(["t0", "new"], ["a", "b"], path="valid.csv"))
    assert any("valid.csv" in w and "1 validation" in w for w in warnings)


def test_unlabelled_training_data_is_an_error():
    with pytest.raises(DataError, match="no labels"):
        check_training_data(LabelledData(["a", "b"], None, "t.csv"))


def test_check_known_labels():
    data = labelled("abc", ["pos", "neg", "meh"], path="test.jsonl")
    check_known_labels(labelled("ab", ["pos", "neg"]), ["neg", "pos"])
    err = pytest.raises(DataError, check_known_labels, data, ["neg", "pos"]).value
    text = assert_one_line(err, "test.jsonl", 4)
    assert "'meh'" in text and "'pos'" in text


# ---------------------------------------------------------------- splitting


def test_split_deterministic_and_keeps_every_class():
    labels = ["big"] * 200 + ["small"] * 3 + ["pair"] * 2 + ["single"]
    data = labelled([f"t{i}" for i in range(len(labels))], labels)
    train, valid = stratified_split(data, 0.05, seed=1)
    again_train, again_valid = stratified_split(data, 0.05, seed=1)
    assert (train.texts, valid.texts) == (again_train.texts, again_valid.texts)
    assert stratified_split(data, 0.05, seed=2)[1].texts != valid.texts
    assert set(train.labels) == {"big", "small", "pair", "single"}
    assert set(valid.labels) == {"big", "small", "pair"}
    assert sorted(train.texts + valid.texts) == sorted(data.texts)
    assert train.lines == sorted(train.lines) and valid.path == "train.csv"
    assert 9 <= len(valid) <= 12


def test_split_large_fraction_keeps_pairs_in_train():
    labels = ["big"] * 100 + ["pair"] * 2
    train, valid = stratified_split(labelled([f"t{i}" for i in range(102)], labels), 0.9)
    assert train.labels.count("pair") == 1 and valid.labels.count("pair") == 1


def test_split_many_classes_small_fraction():
    labels = [f"c{i % 30}" for i in range(90)]
    train, valid = stratified_split(labelled([f"t{i}" for i in range(90)], labels), 0.01)
    assert set(valid.labels) == set(labels) == set(train.labels)


def test_split_min_valid_and_bad_inputs():
    data = labelled([f"t{i}" for i in range(40)], ["a", "b"] * 20)
    assert len(stratified_split(data, 0.01, min_valid=6)[1]) == 6
    with pytest.raises(ValueError):
        stratified_split(data, 1.5)
    with pytest.raises(DataError, match="single example"):
        stratified_split(labelled("ab", ["x", "y"]), 0.5)


def test_read_records_keeps_every_column_in_read_texts_order(tmp_path):
    from potluck.data import read_texts
    from potluck.tables import fresh_names, read_records

    csv_file = tmp_path / "in.csv"
    csv_file.write_text('id,text,label\n1,"server, down",urgent\n\n2,thanks,calm\n')
    assert read_records(csv_file) == [{"id": "1", "text": "server, down", "label": "urgent"},
                                      {"id": "2", "text": "thanks", "label": "calm"}]
    assert read_texts(csv_file).texts == [r["text"] for r in read_records(csv_file)]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "a", "meta": {"k": 1}}\n\n{"text": "b", "meta": null}\n')
    assert [r["meta"] for r in read_records(jsonl)] == [{"k": 1}, None]
    names = fresh_names(["predicted_label", "p_x", "p_y"], {"predicted_label", "p_x", "potluck_p_x"})
    assert names == {"predicted_label": "potluck_predicted_label", "p_x": "potluck_p_x_2", "p_y": "p_y"}


def test_many_small_classes_give_one_warning_line(caplog):
    import logging

    from potluck.data import LabelledData, check_training_data

    texts = [f"text {i}" for i in range(300)]
    labels = [f"intent_{i % 77}" for i in range(300)]  # 77 classes of 3 or 4 examples, as 300 banking77 rows
    with caplog.at_level(logging.WARNING):
        warnings = check_training_data(LabelledData(texts, labels))
    assert len(warnings) == 1 and "77 of 77 classes have fewer than 8 examples" in warnings[0]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
