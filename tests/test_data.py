"""`data`: text sources become token windows; the built-in corpus's two parts do not overlap."""
from __future__ import annotations

import json

import numpy as np
import pytest

from optpipe import data
from optpipe.errors import RecipeError
from optpipe.recipe import DataSpec


class _Chars:
    """A tokenizer with one token a character: window arithmetic can be checked by hand."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_windows_are_cut_from_the_first_max_tokens_and_short_tails_dropped(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("a" * 50 + "\n\n" + "b" * 28, encoding="utf-8")  # joined by one blank line: 50 + 2 + 28 = 80 tokens
    w = data.token_windows(DataSpec(source=str(src), window=32, max_tokens=75), _Chars())
    assert [x.size for x in w.windows] == [32, 32]  # 75 tokens: 32 + 32 + an 11-token tail (< 16, dropped)
    assert w.tokens == 64 and w.eos_token_id == 0
    assert w.describe() == {"source": str(src), "tokens": 64, "windows": 2, "window": 32}
    assert bytes(np.concatenate(w.windows).astype(np.uint8)).decode() == "a" * 50 + "\n\n" + "b" * 12


def test_a_jsonl_source_reads_its_text_field_and_names_a_missing_one(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(json.dumps({"body": "x" * 20}) for _ in range(2)), encoding="utf-8")
    assert data.token_windows(DataSpec(source=str(src), text_field="body", window=16), _Chars()).tokens == 32
    with pytest.raises(RecipeError, match=r"evaluation.text_field: column 'text' not in .*columns: body"):
        data.token_windows(DataSpec(source=str(src)), _Chars(), field_name="evaluation")


def test_markdown_is_read_as_plain_text_and_an_unknown_file_type_is_refused_with_the_known_ones(tmp_path):
    src = tmp_path / "notes.md"
    src.write_text("# Title\n\n" + "x" * 20, encoding="utf-8")
    assert data.load_text(DataSpec(source=str(src))) == "# Title\n\n" + "x" * 20
    doc = tmp_path / "notes.docx"
    doc.write_bytes(b"PK\x03\x04")
    with pytest.raises(RecipeError, match=r"evaluation.source: notes.docx: unsupported file type \(use .txt, .*\.md"):
        data.load_text(DataSpec(source=str(doc)), field_name="evaluation")


def test_too_little_text_and_unknown_builtins_are_refused_naming_the_field(tmp_path):
    src = tmp_path / "short.txt"
    src.write_text("only a few", encoding="utf-8")
    with pytest.raises(RecipeError, match="calibration.source: fewer than 16 tokens"):
        data.token_windows(DataSpec(source=str(src)), _Chars(), field_name="calibration")
    with pytest.raises(RecipeError, match="evaluation.source: unknown builtin 'builtin:wiki'"):
        data.load_text(DataSpec(source="builtin:wiki"), field_name="evaluation")


def test_the_builtin_calibration_and_evaluation_texts_share_no_paragraph():
    def paragraphs(name):
        text = data.builtin_path(name).read_text(encoding="utf-8")
        return {p.strip() for p in text.split("\n\n") if len(p.strip()) > 40}

    calib, evaluation = paragraphs("builtin:calibration"), paragraphs("builtin:evaluation")
    assert calib and evaluation and not calib & evaluation
