import pytest

from sensiquant.data import load_rows, load_text, wikitext_rows
from sensiquant.errors import SensiquantError


def test_wikitext_rows_rebuilt_like_the_hub(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Body text . \n")
    assert wikitext_rows(raw) == ["", " = Title = \n", "", " Body text . \n"]


def test_named_sets_from_shared_data(data_dir):
    assert len(load_rows("wikitext2", "test", data_dir)) == 4358
    assert len(load_rows("wikitext2", "validation", data_dir)) == 3760
    assert len(load_rows("c4", "validation", data_dir)) == 2000
    text = load_text("wikitext2", "test", data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")


def test_text_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world")
    assert load_text(str(f)) == "hello world"


def test_errors(tmp_path):
    with pytest.raises(SensiquantError, match="unknown dataset"):
        load_rows("imagenet")
    with pytest.raises(SensiquantError, match="splits"):
        load_rows("wikitext2", "train")
    with pytest.raises(SensiquantError, match="missing from the data directory"):
        load_rows("wikitext2", "test", tmp_path)
