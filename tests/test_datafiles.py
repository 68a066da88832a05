import pytest

from rankdown.datafiles import load_data
from rankdown.errors import RankdownError


def test_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x = 1"}\n\n{"prompt": "2+2=", "answer": " 4 "}\n')
    data = load_data(tmp_path)
    assert data.texts == ("hello world\n", "x = 1") and data.qa[0].answer == "4"
    assert load_data(tmp_path / "b.jsonl").qa[0].prompt == "2+2="


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", "", "no data"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "bad.jsonl:2: not a JSON object"),
        ("keys.jsonl", '{"question": "?"}\n', "keys.jsonl:1: expected"),
        ("data.csv", "a,b\n", "unsupported data file"),
    ],
)
def test_bad_data_files_name_the_file_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(RankdownError, match=message):
        load_data(path)


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(RankdownError, match="no such file"):
        load_data(tmp_path / "nope.jsonl")
    with pytest.raises(RankdownError, match="no .txt or .jsonl"):
        load_data(tmp_path)
