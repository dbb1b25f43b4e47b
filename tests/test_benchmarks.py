"""Benchmark loaders on parquet files written in each benchmark's real lmms-lab column layout
(../shared/BENCHMARKS.md), read through the same path as `atr eval --data`."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval_helpers import benchmark_items as load_items
from pipeline.benchmarks import BENCHMARKS, aggregate, spec
from pipeline.metrics import extract_mcq_answer, multiple_choice_accuracy

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(colour=(200, 30, 30)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": "x.png"}


def _write(path, columns: dict, types: dict | None = None):
    types = types or {}
    def kind(k):
        return IMAGE_TYPE if k == "image" or (k.startswith("image_") and k[6:].isdigit()) else None

    arrays = {k: pa.array(v, type=types.get(k, kind(k))) for k, v in columns.items()}
    pq.write_table(pa.table(arrays), path)
    return path


def test_docvqa_and_infovqa(tmp_path):
    f = _write(tmp_path / "docvqa.parquet", {
        "questionId": ["337", "338"], "question": ["What is the date?", "Who signed?"],
        "question_types": [["handwritten"], ["layout"]], "image": [_png(), _png()], "docId": [279, 280],
        "ucsf_document_id": ["a", "b"], "ucsf_document_page_no": ["1", "2"],
        "answers": [["1/8/93", "January 8, 1993"], ["J. Doe"]], "data_split": ["val", "val"]})
    for name in ("docvqa_val", "infovqa_val"):
        items = load_items(name, [f], 10)
        assert [i.sample_id for i in items] == ["337", "338"]
        assert items[0].prompt == "What is the date?\nAnswer the question using a single word or phrase."
        assert items[0].image.size == (40, 30) and items[0].image.mode == "RGB"
        s = spec(name)
        assert s.metric == "anls" and s.max_new_tokens == 32
        assert s.score("january 8, 1993", items[0]) == 1.0
        assert s.score("1/8/9", items[0]) == pytest.approx(1 - 1 / 6)


def test_chartqa(tmp_path):
    f = _write(tmp_path / "c.parquet", {"type": ["human_test", "augmented_test"], "question": ["How many?", "Max?"],
                                        "answer": ["12", "Yes"], "image": [_png(), _png()]})
    items = load_items("chartqa", [f], 10)
    assert items[0].prompt == "How many?\nAnswer the question with a single word."
    s = spec("chartqa")
    assert s.metric == "relaxed_overall" and s.max_new_tokens == 16
    assert s.score("12.5", items[0]) == 1.0 and s.score("13", items[0]) == 0.0 and s.score("yes", items[1]) == 1.0


def test_textvqa_has_no_ocr_tokens_in_the_prompt(tmp_path):
    f = _write(tmp_path / "t.parquet", {
        "image_id": ["i1"], "question_id": [34602], "question": ["WHAT brand is THIS?"],
        "question_tokens": [["what"]], "image": [_png()], "image_width": [40], "image_height": [30],
        "flickr_original_url": [""], "flickr_300k_url": [""], "answers": [["nokia"] * 6 + ["toshiba"] * 4],
        "image_classes": [["phone"]], "set_name": ["val"], "ocr_tokens": [["nokia", "phone"]]},
        {"question_id": pa.int32()})
    item = load_items("textvqa_val", [f], 10)[0]
    assert item.prompt == "What brand is this?\nAnswer the question using a single word or phrase."
    assert "nokia" not in item.prompt and item.sample_id == "34602"
    assert spec("textvqa_val").score("Nokia", item) == 1.0
    assert spec("textvqa_val").score("toshiba", item) == pytest.approx((6 * 1 + 4 * 1.0) / 10)


def test_mmbench_options_hint_and_circular_eval(tmp_path):
    f = _write(tmp_path / "m.parquet", {
        "index": [241, 1000241, 7], "question": ["Which colour?", "Which colour?", "Shape?"],
        "hint": ["Look closely.", "Look closely.", "nan"], "A": ["red", "blue", "circle"],
        "B": ["blue", "red", "square"], "C": ["green", "green", "nan"], "D": [None, None, None],
        "answer": ["A", "B", "B"], "image": [_png()] * 3, "category": ["c"] * 3, "L2-category": ["l"] * 3,
        "source": ["s"] * 3, "split": ["dev"] * 3, "comment": ["nan"] * 3}, {"index": pa.int64()})
    items = load_items("mmbench_en_dev", [f], 10)
    assert items[0].prompt == ("Look closely. Which colour? There are several options:\nA. red\nB. blue\nC. green\n\n"
                               "Answer with the option's letter from the given choices directly.")
    assert items[2].prompt.startswith("Shape? There are several options:\nA. circle\nB. square\n\n")
    s = spec("mmbench_en_dev")
    scores = [s.score("A", items[0]), s.score("A", items[1]), s.score("(B) square", items[2])]
    assert scores == [1.0, 0.0, 1.0]
    assert aggregate("mmbench_en_dev", scores, items) == 0.5  # question 241 fails its shifted copy


def test_ai2d_letter_target_and_filter(tmp_path):
    f = _write(tmp_path / "a.parquet", {"question": ["Which stage?"], "options": [["egg", "larva", "adult"]],
                                        "answer": ["1"], "image": [_png()]})
    item = load_items("ai2d", [f], 10)[0]
    assert item.prompt == ("Which stage?\nA. egg\nB. larva\nC. adult\n"
                           "Answer with the option's letter from the given choices directly.")
    s = spec("ai2d")
    assert [s.score(p, item) for p in ("B", "b", "B.", "(B)", "B. larva", "B) foo", "The answer is B")] == \
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_gqa_joins_questions_to_images(tmp_path):
    _write(tmp_path / "testdev_balanced_instructions.parquet", {
        "id": ["q1", "q2"], "imageId": ["n1", "n2"], "question": ["Is it red?", "What is it?"],
        "answer": ["yes", "cup"], "fullAnswer": ["Yes, it is.", "A cup."], "isBalanced": [True, True],
        "groups": [{"global": None, "local": "x"}] * 2, "entailed": ["[]"] * 2, "equivalent": ["[]"] * 2,
        "types": [{"structural": "verify", "semantic": "attr", "detailed": "x"}] * 2,
        "annotations": [{"answer": [], "question": [], "fullAnswer": []}] * 2,
        "semantic": [[{"operation": "select", "argument": "x", "dependencies": [0]}]] * 2, "semanticStr": ["x"] * 2})
    _write(tmp_path / "testdev_balanced_images.parquet", {"id": ["n1", "n2", "n3"],
                                                          "image": [_png((1, 2, 3)), _png((9, 9, 9)), _png()]})
    items = load_items("gqa", sorted(tmp_path.glob("*.parquet")), 10)
    assert [i.sample_id for i in items] == ["q1", "q2"]
    assert items[1].image.getpixel((0, 0)) == (9, 9, 9)
    assert items[0].prompt == "Is it red?\nAnswer the question using a single word or phrase."
    assert spec("gqa").score("Yes.", items[0]) == 1.0


def test_mmmu_multiple_choice_and_open(tmp_path):
    cols = {"id": ["validation_Art_1", "validation_Math_2"],
            "question": ["<image 1> Which style is shown?", "What is x in <image 2>?"],
            "options": ["['Baroque', 'Cubism', 'Gothic']", "[]"], "explanation": ["", ""],
            "image_1": [_png(), None], "image_2": [None, _png((5, 5, 5))],
            **{f"image_{i}": [None, None] for i in range(3, 8)},
            "img_type": ["['Paintings']", "['Plots']"], "answer": ["B", "3.5"],
            "topic_difficulty": ["Easy", "Hard"], "question_type": ["multiple-choice", "open"],
            "subfield": ["a", "b"]}
    f = _write(tmp_path / "mmmu.parquet", cols)
    items = load_items("mmmu_val", [f], 10)
    assert items[0].prompt == ("<image 1> Which style is shown?\nA. Baroque\nB. Cubism\nC. Gothic\n\n"
                               "Answer with the option's letter from the given choices directly.")
    assert items[1].prompt == "What is x in <image 2>?\n\nAnswer the question using a single word or phrase."
    assert items[1].image.getpixel((0, 0)) == (5, 5, 5)  # the image the question refers to
    s = spec("mmmu_val")
    assert s.score("(B)", items[0]) == 1.0 and s.score("The answer is Cubism and nothing else", items[0]) == 1.0
    assert s.score("x is 3.50", items[1]) == 1.0 and s.score("x is 4", items[1]) == 0.0


def test_mmstar_prompt_and_category_average(tmp_path):
    f = _write(tmp_path / "s.parquet", {
        "index": [0, 1, 2], "question": ["Is it a cat? Please answer yes or no. A: yes B: no",
                                         "Which? A: x B: y", "Which? A: x B: y"],
        "image": [_png()] * 3, "answer": ["A", "B", "A"], "category": ["c"] * 3,
        "l2_category": ["one", "two", "two"],
        "meta_info": [{"source": "s", "split": "val", "image_path": "p"}] * 3}, {"index": pa.int64()})
    items = load_items("mmstar", [f], 10)
    assert items[0].prompt == "Is it a cat? A: yes B: no\nAnswer with the option's letter from the given choices directly"
    s = spec("mmstar")
    scores = [s.score("A", items[0]), s.score("B", items[1]), s.score("B", items[2])]
    assert scores == [1.0, 1.0, 0.0]
    assert aggregate("mmstar", scores, items) == pytest.approx((1.0 + 0.5) / 2)


def test_scienceqa_context_and_rule(tmp_path):
    f = _write(tmp_path / "q.parquet", {
        "image": [_png()], "question": ["Which is a mammal?"], "choices": [["frog", "whale"]],
        "answer": [1], "hint": ["Animals live in many places."], "task": ["closed choice"], "grade": ["grade2"],
        "subject": ["natural science"], "topic": ["biology"], "category": ["c"], "skill": ["s"],
        "lecture": [""], "solution": [""]}, {"answer": pa.int8()})
    item = load_items("scienceqa_img", [f], 10)[0]
    assert item.prompt == ("Context: Animals live in many places.\nWhich is a mammal?\nA. frog\nB. whale\n"
                           "Answer with the option's letter from the given choices directly.")
    s = spec("scienceqa_img")
    assert [s.score(p, item) for p in ("b", "B", "B. whale", "whale", "A")] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_mcq_extraction_priorities():
    assert extract_mcq_answer("B") == "B"
    assert extract_mcq_answer("The answer is (C).") == "C"
    assert extract_mcq_answer("A cat is shown, so D") == "A"  # a leading standalone letter (10) beats a final one (9)
    assert extract_mcq_answer("I think it is C") == "C"
    assert extract_mcq_answer("nothing here") == ""  # lmms-eval returns "" when it finds no letter
    assert multiple_choice_accuracy("(b)", "B") == 0.0  # letters are upper-case options
    assert multiple_choice_accuracy("C.", "C") == 1.0


def test_missing_columns_and_unknown_benchmark_are_one_line(tmp_path):
    from storage.benchmarks import BenchmarkFileError

    f = _write(tmp_path / "bad.parquet", {"question": ["q"], "answers": [["a"]]})
    with pytest.raises(BenchmarkFileError, match="missing column.*questionId.*expected columns questionId, question, "
                                                 "answers, image"):
        load_items("docvqa_val", [f], 10)
    with pytest.raises(ValueError, match="unknown benchmark 'docvqa'; valid: " + ", ".join(BENCHMARKS)):
        spec("docvqa")
