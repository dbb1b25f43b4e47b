"""The paper's ten benchmarks and the two synthetic ones, as lmms-eval evaluates them.

A loader turns rows of a benchmark's lmms-lab parquet layout (``storage.benchmarks``
reads the files) into :class:`EvalItem`: the image(s), the prompt text (before the
chat template), the reference answers, and the scoring rule. Column layouts,
prompts, ``max_new_tokens`` and metrics follow ``../shared/BENCHMARKS.md``
(lmms-eval snapshot 75571cfe); each spec names its source columns so a missing
column fails with one line listing them.

Every spec follows lmms-eval 0.7.3's task code as its ``llava_hf`` model runs it, and
``tests/test_lmms_parity.py`` checks that against lmms-eval's own functions: the prompt
(``doc_to_text``), ``max_new_tokens`` (the task's, else llava_hf's 1024), no stop strings
(llava_hf never applies ``until``), the response stripped before scoring, and each task's
answer handling and metric. Where we differ, on purpose:

* MMBench: ``mmbench_en_dev`` asks a GPT judge when its rules find no option; without an
  API the static evaluator of ``mmbench_en_dev_static`` is used (``can_infer``, then
  ``extract_mcq_answer``), with CircularEval. The score is a fraction, not lmms-eval's percent.
* MMMU: where its multiple-choice parser finds no option it picks a letter with Python's
  global ``random``; here the letter is drawn from a generator seeded with the sample id, so
  reruns agree. Like lmms-eval, a question gets every image its prompt names, each pruned on
  its own at the same retention (LLaVA-OneVision refuses such rows: see ``encode_shard``).
* Empty reference lists (ANLS, TextVQA) score 0, where lmms-eval crashes (``min([])``,
  ``statistics.mean([])``).
"""

from __future__ import annotations

import ast
import io
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from PIL import Image

from .config import ConfigError
from .metrics import (anls, exact_match, extract_mcq_answer, mmbench_correct, mmmu_open_correct, mmmu_parse_choice,
                      mmmu_parse_open, multiple_choice_accuracy, relaxed_accuracy, vqa_accuracy)

# lmms-eval's llava_hf generates 1024 new tokens when a task's yaml sets no max_new_tokens
LLAVA_HF_MAX_NEW_TOKENS = 1024
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."


class BadRow(ConfigError):
    """One benchmark row that cannot be used (an undecodable image, a missing field): the sweep skips it
    with one warning line; ``str(exc)`` names the row."""


class ImageCell:
    """A row's encoded image (PNG/JPEG bytes), decoded only when a batch needs its pixels: a benchmark
    of 5,000 pages is never held as pixels."""

    __slots__ = ("data", "where")

    def __init__(self, data: bytes, where: str):
        self.data, self.where = data, where

    def decode(self) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(self.data))
            img.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise BadRow(f"{self.where}: undecodable image ({type(exc).__name__})") from None
        return img.convert("RGB")


@dataclass
class EvalItem:
    """One question ready for the model. ``image_data`` is a PIL image, an :class:`ImageCell` (decoded on
    use) or None; ``image`` gives the decoded RGB image."""

    sample_id: str
    image_data: Image.Image | ImageCell | None
    prompt: str  # the user text; the chat template and image placeholders are added by the caller
    answers: list[str]  # references as strings (what gets stored in eval_samples.answer)
    meta: dict[str, Any] = field(default_factory=dict)
    more_images: list[Image.Image | ImageCell] = field(default_factory=list)  # after the first (MMMU)

    @property
    def has_image(self) -> bool:
        return self.image_data is not None

    @property
    def n_images(self) -> int:
        return 0 if self.image_data is None else 1 + len(self.more_images)

    @property
    def image(self) -> Image.Image | None:
        """The decoded (first) image, decoded again on every access: hold the result, not the item."""
        d = self.image_data
        return d.decode() if isinstance(d, ImageCell) else d

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the prompt, decoded, in the order the prompt's placeholders take them."""
        if self.image_data is None:
            return []
        return [d.decode() if isinstance(d, ImageCell) else d for d in [self.image_data, *self.more_images]]


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    required: tuple[str, ...]
    metric: str  # the eval_scores.metric name
    max_new_tokens: int
    build: Callable[[dict], EvalItem]
    score: Callable[[str, EvalItem], float]
    aggregate: Callable[[list[float], list[EvalItem]], float] | None = None  # default: mean


def image_cell(cell: Any, where: str) -> ImageCell:
    """An lmms-lab image cell (``{"bytes": ..., "path": ...}`` or raw bytes), kept encoded."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise BadRow(f"{where}: empty image cell")
    return ImageCell(bytes(data), where)


def _isna(value: Any) -> bool:
    """``pandas.isna`` for one cell as parquet rows hold them: None or a float NaN."""
    return value is None or (isinstance(value, float) and value != value)


# ---------------------------------------------------------------- answer extraction

def _ai2d_score(prediction: str, item: EvalItem) -> float:
    """AI2D's ``MultiChoiceRegexFilter`` (a leading "X." gives X, else the whole response), then
    exact_match ignoring case and punctuation."""
    m = re.match(r"^\s*([A-Z])\.", prediction)
    return exact_match((m.group(1) if m else prediction).strip(), item.answers[0])


def _scienceqa_score(prediction: str, item: EvalItem) -> float:
    """``sqa_process_results``: the letter itself (any case), or "X." starting the response."""
    target = item.answers[0].strip().lower()
    p = prediction.strip()
    if p.lower() == target:
        return 1.0
    return float(len(p) >= 2 and p[0].isupper() and p[1] == "." and p[0].lower() == target)


def _mmmu_score(prediction: str, item: EvalItem) -> float:
    answer = item.answers[0]
    if item.meta.get("question_type") == "multiple-choice":
        letters = item.meta["letters"]
        choice = mmmu_parse_choice(prediction, letters, item.meta["options"])
        if choice is None:  # MMMU draws a random letter here: seeded by the sample, so reruns agree
            choice = random.Random(item.sample_id).choice(list(letters))
        return float(choice == answer)
    return float(mmmu_open_correct(answer, mmmu_parse_open(prediction)))


def _mmbench_score(prediction: str, item: EvalItem) -> float:
    return float(mmbench_correct(prediction, item.answers[0], dict(item.meta["options"])))


def _mmbench_aggregate(scores: list[float], items: list[EvalItem]) -> float:
    """CircularEval: each question (index < 1e6) counts only if it and every choice-shifted copy
    evaluated with it (index % 1e6 equal) are right; copies whose question was not evaluated do not
    count, as in MMBench's ``eval_result``."""
    groups: dict[int, list[float]] = {}
    for s, item in zip(scores, items):
        groups.setdefault(int(item.meta["index"]) % 1_000_000, []).append(s)
    mains = {int(item.meta["index"]) for item in items if int(item.meta["index"]) < 1_000_000}
    return sum(all(v >= 1.0 for v in groups[i]) for i in mains) / max(1, len(mains))


def _mmstar_aggregate(scores: list[float], items: list[EvalItem]) -> float:
    """Mean per l2_category, then the unweighted mean of those."""
    groups: dict[Any, list[float]] = {}
    for s, item in zip(scores, items):
        groups.setdefault(item.meta.get("l2_category"), []).append(s)
    return sum(sum(g) / len(g) for g in groups.values()) / max(1, len(groups))


# ---------------------------------------------------------------- builders

def _image(row: dict, name: str, column: str = "image") -> ImageCell:
    return image_cell(row[column], f"{name} row {row.get('question_id', row.get('questionId', row.get('index', '?')))}")


def _docvqa(name: str):
    def build(row: dict) -> EvalItem:
        return EvalItem(str(row["questionId"]), _image(row, name), f"{row['question']}\n{SHORT_SUFFIX}",
                        [str(a) for a in row["answers"]])
    return build


def _chartqa(row: dict) -> EvalItem:
    return EvalItem(str(row.get("__index__", "")), _image(row, "chartqa"),
                    f"{row['question']}\nAnswer the question with a single word.", [str(row["answer"])],
                    {"type": row.get("type")})


def _textvqa(row: dict) -> EvalItem:
    return EvalItem(str(row["question_id"]), _image(row, "textvqa_val"),
                    f"{str(row['question']).capitalize()}\n{SHORT_SUFFIX}", [str(a) for a in row["answers"]])


def _mmbench(row: dict) -> EvalItem:
    """``mmbench_doc_to_text`` (with ``create_options_prompt``): options A-E that are truthy, listed
    when not null and not "nan"; the hint leads when not null and not "nan" (an empty hint leaves a
    leading space, as in lmms-eval)."""
    offered = {c: row[c] for c in "ABCDE" if c in row and row[c]}
    listing = "There are several options:\n"
    for key, text in sorted(offered.items()):
        if not _isna(text) and text != "nan":
            listing += f"{key}. {text}\n"
    listing = listing.rstrip("\n")
    hint = row["hint"]
    query = (f"{hint} {row['question']} {listing}" if not _isna(hint) and hint != "nan"
             else f"{row['question']} {listing}")
    # the scorer's options: A-D not null, a missing column read as "nan" (MMBench's build_choices)
    options = {c: str(row.get(c, "nan")) for c in "ABCD" if not _isna(row.get(c, "nan"))}
    return EvalItem(str(row["index"]), _image(row, "mmbench_en_dev"), f"{query}\n\n{MC_SUFFIX}",
                    [str(row["answer"])], {"index": int(row["index"]), "options": options})


def _ai2d(row: dict) -> EvalItem:
    options = list(row["options"])
    lines = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
    return EvalItem(str(row.get("__index__", "")), _image(row, "ai2d"), f"{row['question']}\n{lines}\n{MC_SUFFIX}",
                    [chr(65 + int(row["answer"]))])


def _gqa(row: dict) -> EvalItem:
    return EvalItem(str(row["id"]), _image(row, "gqa"), f"{row['question']}\n{SHORT_SUFFIX}", [str(row["answer"])])


def _mmmu(row: dict) -> EvalItem:
    """``construct_prompt`` and ``mmmu_doc_to_visual``: the images are the ``<image N>`` tags of the
    prompt (question and, for multiple choice, options), sorted as strings; the first is sent."""
    question = str(row["question"])
    qtype = str(row.get("question_type", "multiple-choice"))
    try:
        options = ast.literal_eval(str(row.get("options") or "[]"))
    except (ValueError, SyntaxError):
        if qtype == "multiple-choice":
            raise BadRow(f"mmmu_val row {row.get('id')}: options is not a Python list string") from None
        options = []
    if qtype == "multiple-choice":
        lines = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
        prompt = f"{question}\n{lines}\n\n{MC_SUFFIX}"
    else:
        prompt = f"{question}\n\n{SHORT_SUFFIX}"
    tags = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", prompt)})
    missing = [t for t in tags if row.get(t) is None]
    if missing:  # lmms-eval fails on these rows too (None.convert)
        raise BadRow(f"mmmu_val row {row.get('id')}: the prompt names {', '.join(missing)}, which the row lacks")
    cells = [_image(row, "mmmu_val", t) for t in tags]
    letters = "".join(chr(65 + i) for i in range(len(options)))
    return EvalItem(str(row["id"]), cells[0] if cells else None, prompt, [str(row["answer"])],
                    {"question_type": qtype, "letters": letters, "options": [str(o) for o in options],
                     "images": tags}, cells[1:])


def _mmstar(row: dict) -> EvalItem:
    q = str(row["question"]).strip().replace(" Please answer yes or no.", "")
    return EvalItem(str(row["index"]), _image(row, "mmstar"), f"{q}\n{MC_SUFFIX[:-1]}", [str(row["answer"]).strip()],
                    {"l2_category": row.get("l2_category")})


def _scienceqa(row: dict) -> EvalItem:
    choices = list(row["choices"])
    lines = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    hint = row["hint"]  # sqa_doc_to_text: a falsy hint is formatted as itself (None gives "None")
    context = f"Context: {hint}\n" if hint else f"{hint}"
    image = _image(row, "scienceqa_img") if row.get("image") is not None else None
    return EvalItem(str(row.get("__index__", "")), image, f"{context}{row['question']}\n{lines}\n{MC_SUFFIX}",
                    [chr(65 + int(row["answer"]))])


def _synthetic(name: str):
    def build(row: dict) -> EvalItem:
        return EvalItem(str(row["question_id"]), _image(row, name), str(row["question"]),
                        [str(a) for a in row["answers"]])
    return build


def _mmmu_aggregate(scores: list[float], items: list[EvalItem]) -> float:
    """Instance-level accuracy over all subjects, rounded to 5 places as ``mmmu_aggregate_results``."""
    return round(sum(scores) / max(1, len(scores)), 5)


def _first(fn: Callable[[str, str], float]) -> Callable[[str, EvalItem], float]:
    return lambda p, item: fn(p, item.answers[0])


BENCHMARK_SPECS: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("synthetic-ocr", ("question_id", "question", "answers", "image"), "exact_match", 6,
                  _synthetic("synthetic-ocr"), _first(exact_match)),
    BenchmarkSpec("synthetic-scene", ("question_id", "question", "answers", "image"), "exact_match", 6,
                  _synthetic("synthetic-scene"), _first(exact_match)),
    BenchmarkSpec("docvqa_val", ("questionId", "question", "answers", "image"), "anls", 32,
                  _docvqa("docvqa_val"), lambda p, item: anls(p, item.answers)),
    BenchmarkSpec("infovqa_val", ("questionId", "question", "answers", "image"), "anls", 32,
                  _docvqa("infovqa_val"), lambda p, item: anls(p, item.answers)),
    BenchmarkSpec("chartqa", ("question", "answer", "image"), "relaxed_overall", 16,
                  _chartqa, _first(relaxed_accuracy)),
    BenchmarkSpec("textvqa_val", ("question_id", "question", "answers", "image"), "exact_match", LLAVA_HF_MAX_NEW_TOKENS,
                  _textvqa, lambda p, item: vqa_accuracy(p, item.answers)),
    BenchmarkSpec("mmbench_en_dev", ("index", "question", "hint", "A", "B", "answer", "image"), "circular_accuracy",
                  LLAVA_HF_MAX_NEW_TOKENS, _mmbench, _mmbench_score, _mmbench_aggregate),
    BenchmarkSpec("ai2d", ("question", "options", "answer", "image"), "exact_match", 16, _ai2d, _ai2d_score),
    BenchmarkSpec("gqa", ("id", "question", "answer", "image"), "exact_match", 16, _gqa, _first(exact_match)),
    BenchmarkSpec("mmmu_val", ("id", "question", "options", "answer", "question_type", "image_1"), "mmmu_acc", 128,
                  _mmmu, _mmmu_score, _mmmu_aggregate),
    BenchmarkSpec("mmstar", ("index", "question", "answer", "image", "l2_category"), "average", LLAVA_HF_MAX_NEW_TOKENS,
                  _mmstar, _first(multiple_choice_accuracy), _mmstar_aggregate),
    BenchmarkSpec("scienceqa_img", ("question", "choices", "answer", "hint", "image"), "exact_match", 16,
                  _scienceqa, _scienceqa_score),
]}
BENCHMARKS = tuple(BENCHMARK_SPECS)


def spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARK_SPECS:
        raise ConfigError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    return BENCHMARK_SPECS[name]


def items(name: str, rows: Sequence[dict], offset: int = 0) -> list[EvalItem]:
    """EvalItems of ``rows`` (GQA rows must already carry their joined ``image``); row i is benchmark row
    ``offset + i`` (the index default sample ids use). A malformed row raises :class:`BadRow`."""
    out, _, skipped = build_items(name, rows, offset)
    if skipped:
        raise BadRow(skipped[0][1])
    return out


def build_items(name: str, rows: Sequence[dict], offset: int = 0
                ) -> tuple[list[EvalItem], list[int], list[tuple[int, str]]]:
    """(items, their row indices, skipped): rows that cannot be built are skipped as (row index, reason)."""
    s = spec(name)
    out, where, skipped = [], [], []
    for i, row in enumerate(rows, start=offset):
        try:
            item = s.build({"__index__": i, **row})
        except BadRow as exc:
            skipped.append((i, str(exc)))
            continue
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append((i, f"{name} row {i}: malformed ({type(exc).__name__}: {exc})"))
            continue
        if not item.sample_id:
            item.sample_id = str(i)
        out.append(item)
        where.append(i)
    return out, where, skipped


def score_response(name: str, response: str, item: EvalItem) -> tuple[str, float]:
    """(prediction, score) of one generated response, as lmms-eval scores it with llava_hf: no stop
    string cuts it (llava_hf applies no ``until``), it is stripped, then the task's answer handling
    and metric run on it."""
    prediction = response.strip()
    return prediction, float(spec(name).score(prediction, item))


def aggregate(name: str, scores: list[float], evaluated: list[EvalItem]) -> float:
    s = spec(name)
    if s.aggregate is not None:
        return s.aggregate(scores, evaluated)
    return sum(scores) / max(1, len(scores))


__all__ = ["EvalItem", "ImageCell", "BadRow", "build_items", "score_response", "LLAVA_HF_MAX_NEW_TOKENS", "image_cell", "BenchmarkSpec", "BENCHMARK_SPECS", "BENCHMARKS", "spec", "items", "aggregate",
           "extract_mcq_answer", "multiple_choice_accuracy"]
