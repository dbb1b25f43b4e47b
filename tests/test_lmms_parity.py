"""The built-in harness scores as lmms-eval 0.7.3 does (issue: lmms-eval, item 4).

Each check runs lmms-eval's own task functions (its ``doc_to_text``, filters, ``process_results``,
metrics and MMBench's static evaluator) and the built-in harness side by side on the same rows and
responses: hand-picked adversarial responses (punctuation, trailing explanations, several letters,
empty answers, numbers with commas, Unicode) and seeded random ones built from the same pieces. The
built-in side goes through ``pipeline.benchmarks.build_items`` and ``score_response``, the path
``evaluate_features`` takes. The glue lmms-eval's ``Task`` adds around the functions is done here as
it does it: filters run on the raw response, then the response is stripped
(``Task.process_results``), then the metric. Agreement is counted per metric and printed (``-s``).

Deliberate differences, each checked as such instead of compared: an empty reference list (lmms-eval
crashes: ``min([])`` in ANLS, ``statistics.mean([])`` in TextVQA; we score 0), and MMMU's random
letter when its parser finds no option (lmms-eval uses the global ``random``; we seed by sample id).
"""

from __future__ import annotations

import copy
import io
import math
import random
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from pipeline.benchmarks import BENCHMARKS, build_items, score_response, spec
from pipeline.metrics import CONTRACTIONS, NUMBER_WORDS, anls, mmmu_parse_choice, mmmu_parse_open

pytestmark = pytest.mark.lmms

TASK_YAML = {"docvqa_val": "docvqa/docvqa_val.yaml", "infovqa_val": "infovqa/infovqa_val.yaml",
             "chartqa": "chartqa/chartqa.yaml", "textvqa_val": "textvqa/textvqa_val.yaml",
             "mmbench_en_dev": "mmbench/mmbench_en_dev_static.yaml", "ai2d": "ai2d/ai2d.yaml",
             "gqa": "gqa/gqa.yaml", "mmmu_val": "mmmu/mmmu_val.yaml", "mmstar": "mmstar/mmstar.yaml",
             "scienceqa_img": "scienceqa/scienceqa_img.yaml"}
LLAVA_HF_DEFAULT_MAX_NEW_TOKENS = 1024  # models/simple/llava_hf.py, when a task sets none

# ---------------------------------------------------------------- responses

HAND = [
    "A", "B", "C.", "(D)", "b", "E", "The answer is C because DNA.", "B2", "", "   ", "A and B", "A. cat", "B, C",
    "Answer: D", "I choose B", "答案是C", "Option (B) is wrong; the answer is (D).", "C)", "D:", ":B", "(A).",
    "The best option is E.", "A cat is on the mat, so the answer is D", "a", "(b)", "B.\n\nBecause the cat is black.",
    "4\n\nExplanation: count them", "Nokia.", "nokia", "don't", "dont", "Two dogs", "two", "ten", "none", "1,000",
    "1,234.5", "12%", "0.12", "3.14159", "-2", "1e3", "Yes", "yes!", "no.", "It's 5 o'clock", "the cat's toy",
    "ÉCOLE", "naïve café", "日本", "ß", "ﬁsh", "½", "٣", "x\ny", "The answer is: 42.", "so the result is 7.5",
    "= 12", "Thus 3/4", "the red car", "Left", "\tright\n", '"quoted"', "a.b.c", "yes, it is", "1,000,000 people",
    "C. DNA", "D) dog", "(C) DNA", "The correct answer is B. The other options are wrong.", "A B C D",
    "It is A.", "Both A and C are right, but C is better", "E.", "Z", "F", "A A", "AB", "A:", "A) cat",
    "therefore, the final answer is 2.5", "The result = 3.0", "could be 7 or 8", "1.", "10.4", "10.6",
]
PIECES = ["A", "B", "C", "D", "E", "a", "b", "(A)", "(B)", "C.", "D)", "B:", ":C", "(D).", "A,", "The answer is",
          "answer is", "I choose", "the correct option is", "答案是", "because", "DNA", "cat", "dog", "Nokia", "1,000",
          "1,234.5", "12%", "0.12", "-3", "2.50", "1e3", "3/4", "=", "so", "is", "thus", "therefore", "final answer",
          "result", "two", "ten", "none", "the", "an", "don't", "dont", "isn't", "cant", "o'clock", "it's", "yall",
          "?", "!", ".", ",", ";", ":", "'", '"', "-", "/", "(", ")", "[", "]", "\n", "\n\n", "\t", "é", "naïve", "ß",
          "日本", "İ", "ﬁ", "½", "٣", "yes", "no", "red car", "left"]


def responses(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(HAND)
    for _ in range(n):
        parts = [rng.choice(PIECES) for _ in range(rng.randint(1, 8))]
        out.append("".join(p + rng.choice(["", " ", " ", "  "]) for p in parts))
    return out


RESPONSES = responses()


# ---------------------------------------------------------------- fixtures and helpers

def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


@pytest.fixture(scope="module")
def lm():
    """lmms-eval's task modules and metrics, imported offline."""
    import lmms_eval
    from lmms_eval.api import metrics as lmetrics
    from lmms_eval.tasks._task_utils import mmmu_mcq_utils
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
    from lmms_eval.tasks.ai2d import utils as ai2d
    from lmms_eval.tasks.chartqa import utils as chartqa
    from lmms_eval.tasks.mmbench import en_utils as mmbench
    from lmms_eval.tasks.mmmu import utils as mmmu
    from lmms_eval.tasks.mmstar import utils as mmstar
    from lmms_eval.tasks.scienceqa import utils as scienceqa
    from lmms_eval.tasks.textvqa import utils as textvqa
    from lmms_eval.utils import load_yaml_config

    root = Path(lmms_eval.__file__).parent / "tasks"
    cfg = {name: load_yaml_config(str(root / rel)) for name, rel in TASK_YAML.items()}

    class NS:
        pass

    ns = NS()
    ns.__dict__.update(metrics=lmetrics, mcq=mmmu_mcq_utils, evalai=EvalAIAnswerProcessor, ai2d=ai2d,
                       chartqa=chartqa, mmbench=mmbench, mmmu=mmmu, mmstar=mmstar, scienceqa=scienceqa,
                       textvqa=textvqa, cfg=cfg)
    assert mmmu.config["metadata"]["interleaved_format"] is False  # what llava_hf (a simple model) runs
    return ns


class Tally:
    """Agreement per metric: counts, and the first disagreements for the failure message."""

    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    misses: dict[str, list] = defaultdict(list)

    @classmethod
    def check(cls, metric: str, ours, theirs, case) -> None:
        same = ours == theirs or (isinstance(ours, float) and isinstance(theirs, float)
                                  and math.isclose(ours, theirs, rel_tol=0, abs_tol=1e-12))
        cls.rows[metric][0] += same
        cls.rows[metric][1] += 1
        if not same and len(cls.misses[metric]) < 5:
            cls.misses[metric].append((case, ours, theirs))

    @classmethod
    def assert_all(cls, *metrics: str) -> None:
        for m in metrics:
            agree, total = cls.rows[m]
            print(f"parity {m:28s} {agree:6d}/{total:<6d} agree ({100.0 * agree / max(1, total):.2f}%)")
        bad = {m: cls.misses[m] for m in metrics if cls.misses[m]}
        assert total > 0 and not bad, bad


def _item(name: str, row: dict):
    got, _, skipped = build_items(name, [row])
    assert not skipped, skipped
    return got[0]


def _ours(name: str, response: str, item) -> float:
    return score_response(name, response, item)[1]


# ---------------------------------------------------------------- prompts and generation settings

def _kwargs(lm, name):
    return lm.cfg[name].get("lmms_eval_specific_kwargs", {}).get("default")


def _docs(name: str) -> list[tuple[dict, dict]]:
    """(our parquet-layout row, lmms-eval's doc) pairs with the awkward values each task must handle."""
    pil = Image.new("RGB", (8, 8))
    out = []
    if name in ("docvqa_val", "infovqa_val"):
        for q in ("What is the total?", "  padded  ", "ÉCOLE naïve?", ""):
            out.append({"questionId": "1", "question": q, "answers": ["a"], "image": {"bytes": PNG}})
    elif name in ("chartqa", "gqa"):
        for q in ("How many bars?", "Is it red?\n", "日本?"):
            out.append({"id": "1", "question": q, "answer": "2", "type": "human_test", "image": {"bytes": PNG}})
    elif name == "textvqa_val":
        for q in ("what brand is this?", "WHAT IS IT", "éclair name?", ""):
            out.append({"question_id": 1, "question": q, "answers": ["a"] * 10, "image": {"bytes": PNG}})
    elif name == "mmbench_en_dev":
        for hint in ("Look closely.", "", "nan", None, float("nan"), "None"):
            for opts in ({"A": "red", "B": "blue", "C": "green", "D": "pink"},
                         {"A": "red", "B": "blue", "C": None, "D": None},
                         {"A": "red", "B": "blue", "C": "nan", "D": ""},
                         {"A": "red", "B": " ", "C": float("nan"), "D": "two\n"},
                         {"A": "red", "B": "blue", "C": "c", "D": "d", "E": "e"},
                         {"A": "", "B": None}):
                out.append({"index": 7, "question": "Which colour?", "hint": hint, "answer": "A", "category": "c",
                            "L2-category": "l", "source": "s", "split": "dev", "image": {"bytes": PNG}, **opts})
    elif name == "ai2d":
        for opts in (["egg", "larva"], ["a", "b", "c", "d", "e"], ["<b>", ""]):
            out.append({"question": "Which stage?", "options": opts, "answer": "1", "image": {"bytes": PNG}})
    elif name == "mmstar":
        for q in ("Is it red? Please answer yes or no.", "  Which one?\nA: x\nB: y  ", "Count."):
            out.append({"index": 1, "question": q, "answer": "A", "category": "c", "l2_category": "l",
                        "image": {"bytes": PNG}})
    elif name == "scienceqa_img":
        for hint in ("Animals live in many places.", "", None, "nan", float("nan")):
            out.append({"question": "Which is a mammal?", "choices": ["frog", "whale", "é"], "answer": 1,
                        "hint": hint, "image": {"bytes": PNG}})
    elif name == "mmmu_val":
        for q, opts, qtype in (("Which <image 1> is it?", "['cat', 'dog']", "multiple-choice"),
                               ("Compare <image 2> and <image 1>.", "['<image 3>', '<image 4>', 'neither']",
                                "multiple-choice"),
                               ("What is x?", "[]", "open"),
                               ("See <image 1>: what is x? Not <image 2>.", "['<image 3>']", "open")):
            out.append({"id": "validation_Art_1", "question": q, "options": opts, "question_type": qtype,
                        "answer": "A", **{f"image_{k}": {"bytes": _png((k, k))} for k in range(1, 8)}})
    pairs = []
    for row in out:
        doc = {k: (pil if isinstance(v, dict) and "bytes" in v else v) for k, v in row.items()}
        if name == "mmmu_val":
            doc.update({f"image_{k}": Image.new("RGB", (k, k)) for k in range(1, 8)})
        pairs.append((row, doc))
    return pairs


def test_prompts_match_lmms_eval_doc_to_text(lm):
    for name in BENCHMARKS:
        if name.startswith("synthetic"):
            continue
        cfg = lm.cfg[name]
        for row, doc in _docs(name):
            theirs = cfg["doc_to_text"](copy.deepcopy(doc), _kwargs(lm, name))
            Tally.check(f"prompt {name}", _item(name, row).prompt, theirs, row)
    Tally.assert_all(*(f"prompt {n}" for n in BENCHMARKS if not n.startswith("synthetic")))


def test_generation_settings_match_llava_hf(lm):
    """max_new_tokens is the task's, else llava_hf's default; no stop string applies (llava_hf pops
    ``until`` and never uses it), so a response with a blank line is scored whole."""
    for name, cfg in lm.cfg.items():
        want = cfg.get("generation_kwargs", {}).get("max_new_tokens", LLAVA_HF_DEFAULT_MAX_NEW_TOKENS)
        Tally.check("max_new_tokens", (name, spec(name).max_new_tokens), (name, want), name)
    item = _item("docvqa_val", {"questionId": "1", "question": "q", "answers": ["4 Explanation"],
                                "image": {"bytes": PNG}})
    prediction, score = score_response("docvqa_val", "  4\n\nExplanation  ", item)
    assert prediction == "4\n\nExplanation"  # whole, stripped
    assert score == lm.metrics.anls(references=["4 Explanation"], predictions=["4\n\nExplanation"])["anls"]
    Tally.assert_all("max_new_tokens")


def test_mmmu_sends_the_images_lmms_eval_sends(lm):
    for row, doc in _docs("mmmu_val"):
        theirs = [im.size[0] for im in lm.mmmu.mmmu_doc_to_visual(doc)]  # image_k is k x k pixels
        item = _item("mmmu_val", row)
        ours = [int(t.split("_")[1]) for t in item.meta["images"]]
        Tally.check("mmmu images named", ours, theirs, row["question"])
        first = item.image.size[0] if item.has_image else None
        Tally.check("mmmu image sent (first)", first, theirs[0] if theirs else None, row["question"])
    Tally.assert_all("mmmu images named", "mmmu image sent (first)")


# ---------------------------------------------------------------- metrics

ANSWER_LISTS = [["K7X"], ["Nokia", "nokia phone"], ["1,000"], ["ß"], ["naïve café"], [" padded "], [""],
                ["12%"], ["the cat", "cat"], ["日本"], ["A"], ["yes"]]


def test_anls_docvqa_and_infovqa(lm):
    for name in ("docvqa_val", "infovqa_val"):
        for answers in ANSWER_LISTS:
            item = _item(name, {"questionId": "1", "question": "q", "answers": answers, "image": {"bytes": PNG}})
            for r in RESPONSES:
                theirs = lm.metrics.anls(references=answers, predictions=[r.strip()])["anls"]
                Tally.check("anls", _ours(name, r, item), float(theirs), (r, answers))
    # an empty reference list: lmms-eval crashes (min([])); we score 0
    with pytest.raises(ValueError):
        lm.metrics.anls(references=[], predictions=["x"])
    assert anls("x", []) == 0.0
    Tally.assert_all("anls")


def test_chartqa_relaxed_accuracy(lm):
    for answer in ("12", "0.12", "12%", "Yes", "yes ", "0", "1,000", "-3", "nan", "inf", "Nokia", "", "2.50", "1e3"):
        for kind in ("human_test", "augmented_test"):
            doc = {"question": "q", "answer": answer, "type": kind}
            item = _item("chartqa", {**doc, "image": {"bytes": PNG}})
            for r in RESPONSES:
                theirs = lm.chartqa.chartqa_process_results(doc, [r.strip()])["relaxed_overall"]
                Tally.check("chartqa relaxed_overall", _ours("chartqa", r, item), theirs, (r, answer))
    Tally.assert_all("chartqa relaxed_overall")


def test_textvqa_evalai_processor_and_vqa_accuracy(lm):
    proc = lm.evalai()
    assert CONTRACTIONS == lm.evalai.CONTRACTIONS  # the full table, quirks included
    assert NUMBER_WORDS == {k: v for k, v in lm.evalai.NUMBER_MAP.items() if k in NUMBER_WORDS}
    from pipeline.metrics import normalize_vqa_answer

    words = list(CONTRACTIONS) + list(CONTRACTIONS.values()) + list(NUMBER_WORDS) + ["the", "an", "a"]
    for text in RESPONSES + words + ["Id've", "I'm", "it's 5.5.5 p.m.", "1,000", "a-b", "(x) = y", "x ;y", "x; y",
                                     "a. " * 40 + "end"]:  # EvalAI drops at most 32 periods
        Tally.check("evalai answer processor", normalize_vqa_answer(text), proc(text), text)
    answer_sets = [["2"] * 3 + ["3"] * 7, ["nokia"] * 10, ["Nokia", "nokia", "NOKIA!", "nokia phone"] + ["n"] * 6,
                   ["don't"] * 4 + ["do not"] * 6, ["1000"] * 5 + ["1,000"] * 5, ["two dogs", "2 dogs", "2"] * 3 + ["x"],
                   ["yes"], ["the cat"] * 10, ["日本"] * 3 + ["japan"] * 7, ["12%"] * 10]
    for answers in answer_sets:
        item = _item("textvqa_val", {"question_id": 1, "question": "q", "answers": answers, "image": {"bytes": PNG}})
        for r in RESPONSES:
            doc = {"question_id": 1, "answers": list(answers)}
            theirs = lm.textvqa.textvqa_process_results(doc, [r.strip()])["exact_match"]
            Tally.check("textvqa exact_match", _ours("textvqa_val", r, item), float(theirs), (r, answers))
    with pytest.raises(statistics.StatisticsError):  # an empty answer list: lmms-eval crashes, we score 0
        lm.textvqa.textvqa_process_results({"question_id": 1, "answers": []}, ["x"])
    Tally.assert_all("evalai answer processor", "textvqa exact_match")


def test_gqa_exact_match(lm):
    for answer in ("yes", "no", "left", "red car", " Cat", "ﬁsh", "2", "the table", "İ"):
        item = _item("gqa", {"id": "1", "question": "q", "answer": answer, "image": {"bytes": PNG}})
        for r in RESPONSES:
            theirs = lm.metrics.exact_match_hf_evaluate(references=[answer], predictions=[r.strip()], ignore_case=True,
                                                        ignore_punctuation=True)["exact_match"]
            Tally.check("gqa exact_match", _ours("gqa", r, item), float(theirs), (r, answer))
    Tally.assert_all("gqa exact_match")


def test_ai2d_filter_and_exact_match(lm):
    filt = lm.ai2d.MultiChoiceRegexFilter(regex_pattern=r"([A-Z])\.", group_select=0, ignore_case=True,
                                          ignore_punctuation=True)
    for opts in (["egg", "larva"], ["a", "b", "c", "d"], ["w", "x", "y", "z", "v"]):
        for answer in range(len(opts)):
            doc = {"question": "q", "options": opts, "answer": str(answer)}
            item = _item("ai2d", {**doc, "image": {"bytes": PNG}})
            target = lm.ai2d.ai2d_doc_to_target(doc, "mcq")
            for r in RESPONSES:
                filtered = filt.apply([[r]], [doc])[0].strip()  # the filter sees the raw response
                theirs = lm.metrics.exact_match_hf_evaluate(references=[target], predictions=[filtered],
                                                            ignore_case=True, ignore_punctuation=True)["exact_match"]
                Tally.check("ai2d exact_match", _ours("ai2d", r, item), float(theirs), (r, target))
    Tally.assert_all("ai2d exact_match")


def test_scienceqa_letter_rule(lm):
    for n in (2, 3, 5):
        for answer in range(n):
            doc = {"question": "q", "choices": [f"c{i}" for i in range(n)], "answer": answer, "hint": ""}
            item = _item("scienceqa_img", {**doc, "image": {"bytes": PNG}})
            for r in RESPONSES:
                theirs = lm.scienceqa.sqa_process_results(doc, [r.strip()])["exact_match"]
                Tally.check("scienceqa exact_match", _ours("scienceqa_img", r, item), theirs, (r, answer))
    Tally.assert_all("scienceqa exact_match")


def test_mmstar_letter_extraction_and_category_average(lm):
    results, items, scores = [], [], []
    rng = random.Random(1)
    for answer in ("A", "B", "C", "D", " b ", "E"):
        row = {"index": 1, "question": "q", "answer": answer, "category": "coarse perception",
               "l2_category": "image emotion", "image": {"bytes": PNG}}
        item = _item("mmstar", row)
        for r in RESPONSES:
            got = lm.mmstar.mmstar_process_results(row, [r.strip()])
            Tally.check("mmstar letter", _ours("mmstar", r, item), got["average"]["score"], (r, answer))
    for i, r in enumerate(RESPONSES[:200]):  # the unweighted mean over l2 categories
        row = {"index": i, "question": "q", "answer": rng.choice("ABCD"), "category": "math",
               "l2_category": rng.choice(["geometry", "statistical reasoning", "numeric commonsense and calculation"]),
               "image": {"bytes": PNG}}
        item = _item("mmstar", row)
        results.append(lm.mmstar.mmstar_process_results(row, [r.strip()])["average"])
        items.append(item)
        scores.append(_ours("mmstar", r, item))
    from pipeline.benchmarks import aggregate

    Tally.check("mmstar average", aggregate("mmstar", scores, items), lm.mmstar.mmstar_aggregate_results(results),
                "200 rows")
    Tally.assert_all("mmstar letter", "mmstar average")


def _mmbench_frame(lm, rows_and_preds):
    """MMBench's ``eval_result`` prepares its frame like this before judging."""
    import pandas as pd

    data = pd.DataFrame([lm.mmbench.mmbench_process_results(doc, [pred])["gpt_eval_score"]
                         for doc, pred in rows_and_preds]).sort_values(by="index")
    data["prediction"] = [str(x) for x in data["prediction"]]
    for k in list(data.keys()):
        data[k.lower() if k not in "ABCD" else k] = data.pop(k)
    return data


MMBENCH_OPTIONS = ({"A": "red", "B": "blue", "C": "green", "D": "pink"}, {"A": "cat", "B": "dog", "C": None, "D": None},
                   {"A": "1,000", "B": "A cat", "C": "nan", "D": ""}, {"A": "red", "B": " ", "C": "DNA", "D": "dna b"},
                   {"A": "Nokia", "B": "naïve café", "C": "ß", "D": "日本"})


def test_mmbench_can_infer_and_static_extraction_per_row(lm):
    ev = lm.mmbench.mmbench_evaluator
    for opts in MMBENCH_OPTIONS:
        for answer in "ABCD":
            if opts[answer] is None:
                continue
            doc = {"index": 5, "question": "q", "hint": "nan", "answer": answer, "category": "c", "L2-category": "l",
                   "source": "s", "split": "dev", **opts}
            item = _item("mmbench_en_dev", {**doc, "image": {"bytes": PNG}})
            for r in RESPONSES:
                data = _mmbench_frame(lm, [(doc, r.strip())])
                theirs = ev.eval_sub_data(data, {5: answer}, static_only=True)
                Tally.check("mmbench row (can_infer + extract)", _ours("mmbench_en_dev", r, item), float(theirs),
                            (r, answer, opts))
    Tally.assert_all("mmbench row (can_infer + extract)")


def test_mmbench_circular_eval(lm):
    """Questions with choice-shifted copies (index + k * 1e6), some copies missing and some questions
    absent (a copy without its question does not count), scored by ``eval_result`` and by us."""
    from pipeline.benchmarks import aggregate

    rng = random.Random(2)
    for trial in range(20):
        pairs, items, scores = [], [], []
        for q in range(12):
            opts = rng.choice(MMBENCH_OPTIONS)
            letters = [c for c in "ABCD" if opts[c] is not None]
            for k in range(rng.randint(1, 4)):
                if k == 0 and rng.random() < 0.15:
                    continue  # the question itself not evaluated
                index = q + k * 1_000_000
                doc = {"index": index, "question": "q", "hint": "nan", "answer": rng.choice(letters), "category": "c",
                       "L2-category": "l", "source": "s", "split": "dev", **opts}
                r = rng.choice([doc["answer"], rng.choice(letters), rng.choice(RESPONSES)])
                item = _item("mmbench_en_dev", {**doc, "image": {"bytes": PNG}})
                pairs.append((doc, r.strip()))
                items.append(item)
                scores.append(_ours("mmbench_en_dev", r, item))
        overall, _, _ = lm.mmbench.mmbench_evaluator.eval_result([lm.mmbench.mmbench_process_results(d, [p])
                                                                  ["gpt_eval_score"] for d, p in pairs], "static")
        # lmms-eval reports a fraction from eval_result (its task metric is that x 100)
        Tally.check("mmbench circular_accuracy", round(aggregate("mmbench_en_dev", scores, items), 12),
                    round(float(overall), 12), trial)
    Tally.assert_all("mmbench circular_accuracy")


def test_mmmu_multiple_choice_and_open_parsing(lm, monkeypatch):
    monkeypatch.setattr(lm.mcq.random, "choice", lambda seq: "RANDOM")  # lmms-eval's no-candidate path, made visible
    for opts in (["cat", "dog"], ["DNA", "RNA", "protein", "1,000"], ["A cat", "B dog", "C", "naïve café", "日本"],
                 ["<image 2>", "<image 3>", "neither"]):
        letters = [chr(65 + i) for i in range(len(opts))]
        for answer in letters:
            doc = {"id": "validation_Art_1", "question": "q <image 1>", "options": str(opts),
                   "question_type": "multiple-choice", "answer": answer}
            row = {**doc, **{f"image_{k}": {"bytes": PNG} for k in (1, 2, 3)}}
            item = _item("mmmu_val", row)
            for r in RESPONSES:
                got = lm.mmmu.mmmu_process_results(doc, [r.strip()])["mmmu_acc"]
                picked = got["parsed_pred"][0]
                ours = mmmu_parse_choice(r.strip(), letters, opts)
                Tally.check("mmmu multiple-choice parse", "RANDOM" if ours is None else ours, picked, (r, opts))
                if picked != "RANDOM":
                    theirs = lm.mmmu.evaluate_mmmu([got])[1]["acc"]
                    Tally.check("mmmu multiple-choice score", _ours("mmmu_val", r, item), float(theirs), (r, answer))
    for gold in ("12", "1,000", "3.14", "Nokia", "x", "1e3", "yes", "-2", "2.50", "naïve café", "0.5", "A"):
        doc = {"id": "validation_Math_3", "question": "q <image 1>", "options": "[]", "question_type": "open",
               "answer": gold}
        item = _item("mmmu_val", {**doc, "image_1": {"bytes": PNG}})
        for r in RESPONSES:
            got = lm.mmmu.mmmu_process_results(doc, [r.strip()])["mmmu_acc"]
            Tally.check("mmmu open parse", sorted(map(repr, mmmu_parse_open(r.strip()))),
                        sorted(map(repr, got["parsed_pred"][0])), r)
            theirs = lm.mmmu.evaluate_mmmu([got])[1]["acc"]
            Tally.check("mmmu open score", _ours("mmmu_val", r, item), float(theirs), (r, gold))
    Tally.assert_all("mmmu multiple-choice parse", "mmmu multiple-choice score", "mmmu open parse", "mmmu open score")


def test_mmmu_aggregate(lm):
    from pipeline.benchmarks import aggregate

    rng = random.Random(3)
    results, items, scores = [], [], []
    for i in range(300):
        subject = rng.choice(["Art", "Math", "Clinical_Medicine", "Computer_Science"])
        doc = {"id": f"validation_{subject}_{i}", "question": "q <image 1>", "options": "['cat', 'dog', 'fish']",
               "question_type": "multiple-choice", "answer": rng.choice("ABC")}
        item = _item("mmmu_val", {**doc, "image_1": {"bytes": PNG}})
        r = rng.choice(["A", "B", "C", "(B)", "C."])
        results.append(lm.mmmu.mmmu_process_results(doc, [r])["mmmu_acc"])
        items.append(item)
        scores.append(_ours("mmmu_val", r, item))
    Tally.check("mmmu_acc aggregate", aggregate("mmmu_val", scores, items), lm.mmmu.mmmu_aggregate_results(results),
                "300 rows")
    Tally.assert_all("mmmu_acc aggregate")
