"""The paper's ten benchmarks and the two synthetic ones, as lmms-eval evaluates them.

A loader turns rows of a benchmark's lmms-lab parquet layout (``storage.benchmarks``
reads the files) into :class:`EvalItem`: the image(s), the prompt text (before the
chat template), the reference answers, and the scoring rule. Column layouts,
prompts, ``max_new_tokens`` and metrics follow ``../shared/BENCHMARKS.md``
(lmms-eval snapshot 75571cfe); each spec names its source columns so a missing
column fails with one line listing them.

Deviations, stated plainly:

* MMBench: lmms-eval's ``mmbench_en_dev`` falls back to a GPT judge when its rules
  find no option; here there is no API, so the rule-based extractor of
  ``mmbench_en_dev_static`` (``extract_mcq_answer``) is used, with CircularEval.
* MMMU: LLaVA-NeXT gets the first image the question refers to (the pruning
  harness handles one image per prompt); questions with several images are rare.
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
from .metrics import anls, exact_match, extract_mcq_answer, multiple_choice_accuracy, relaxed_accuracy, vqa_accuracy

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
    prompt: str  # the user text; the chat template and image placeholder are added by the caller
    answers: list[str]  # references as strings (what gets stored in eval_samples.answer)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image_data is not None

    @property
    def image(self) -> Image.Image | None:
        """The decoded image (decoded again on every access; hold the result, not the item)."""
        d = self.image_data
        return d.decode() if isinstance(d, ImageCell) else d


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


def decode_image_cell(cell: Any, where: str) -> Image.Image:
    """An lmms-lab image cell as RGB, decoded now."""
    return image_cell(cell, where).decode()


def _options(row: dict, letters: str = "ABCDE") -> list[tuple[str, str]]:
    out = []
    for letter in letters:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and value != value):
            continue
        text = str(value)
        if text.strip() and text != "nan":
            out.append((letter, text))
    return out


def _has(value: Any) -> bool:
    return value is not None and str(value) not in ("", "nan", "None")


# ---------------------------------------------------------------- answer extraction

def _ai2d_score(prediction: str, item: EvalItem) -> float:
    m = re.match(r"^\s*([A-Z])\.", prediction)
    return exact_match(m.group(1) if m else prediction, item.answers[0])


def _scienceqa_score(prediction: str, item: EvalItem) -> float:
    target = item.answers[0]
    p = prediction.strip()
    if p.lower() == target.lower():
        return 1.0
    return float(len(p) >= 2 and p[0].isupper() and p[1] == "." and p[0] == target)


def _mmmu_score(prediction: str, item: EvalItem) -> float:
    answer = item.answers[0]
    if item.meta.get("question_type") == "multiple-choice":
        letters = item.meta["letters"]
        return float(_mmmu_parse_choice(prediction, letters, item.meta["options"], item.sample_id) == answer)
    preds = _mmmu_parse_open(prediction)
    golds = [_mmmu_normalize(a) for a in ([answer] if isinstance(answer, str) else answer)]
    for p in preds:
        for g in golds:
            if isinstance(p, str) and isinstance(g, str) and g in p:
                return 1.0
            if isinstance(p, float) and isinstance(g, float) and p == g:
                return 1.0
    return 0.0


def _mmmu_parse_choice(response: str, letters: Sequence[str], options: Sequence[str], seed_key: str) -> str:
    """The official MMMU multiple-choice parser (random letter when nothing is found)."""
    text = " " + response.strip().strip(",.!?;:'") + " "
    found = [c for c in letters if f"({c})" in text]
    if not found:
        found = [c for c in letters if f"{c} " in text]
    if not found:
        found = [c for c in letters if f"{c}." in text]
    if not found and len(text.split()) > 5:
        found = [c for c, o in zip(letters, options) if o.lower() in text.lower()]
    if not found:
        return random.Random(seed_key).choice(list(letters))
    if len(found) > 1:  # the last occurring one
        return max(found, key=lambda c: max(text.rfind(f"({c})"), text.rfind(f"{c} "), text.rfind(f"{c}.")))
    return found[0]


def _mmmu_normalize(value: str) -> Any:
    v = value.strip().replace(",", "")
    try:
        return round(float(v), 2)
    except ValueError:
        v = v.lower()
        return f" {v} " if len(v) == 1 else v


def _mmmu_parse_open(response: str) -> list[Any]:
    text = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response.strip())
    keys = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
    candidates = []
    for i, sentence in enumerate(sentences):
        s = sentence.lower()
        tail = None
        for key in keys + (("=",) if i == len(sentences) - 1 else ()):
            if key in s:
                piece = s.split(key)[-1].strip()
                if tail is None or len(piece) < len(tail):
                    tail = piece
        if tail and tail not in (":", ",", ".", "!", "?", ";", "'"):
            candidates.append(tail)
    if not candidates:
        candidates = [text]
    out: list[Any] = []
    for c in candidates:
        out.append(_mmmu_normalize(c) if not re.search(r"-?\d+(?:\.\d+)?", c) else c)
        out.extend(round(float(n.replace(",", "")), 2) for n in re.findall(r"-?\d[\d,]*(?:\.\d+)?", c))
    return out


def _mmbench_aggregate(scores: list[float], items: list[EvalItem]) -> float:
    """CircularEval: a question counts only if every choice-shifted copy is right."""
    groups: dict[int, list[float]] = {}
    for s, item in zip(scores, items):
        groups.setdefault(int(item.meta["index"]) % 1_000_000, []).append(s)
    return sum(all(v >= 1.0 for v in g) for g in groups.values()) / max(1, len(groups))


def _mmstar_aggregate(scores: list[float], items: list[EvalItem]) -> float:
    """Mean per l2_category, then the unweighted mean of those."""
    groups: dict[str, list[float]] = {}
    for s, item in zip(scores, items):
        groups.setdefault(str(item.meta.get("l2_category")), []).append(s)
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
    opts = sorted(_options(row))
    hint = f"{row['hint']} " if _has(row.get("hint")) else ""
    lines = "\n".join(f"{k}. {v}" for k, v in opts)
    prompt = f"{hint}{row['question']} There are several options:\n{lines}\n\n{MC_SUFFIX}"
    return EvalItem(str(row["index"]), _image(row, "mmbench_en_dev"), prompt, [str(row["answer"]).strip()],
                    {"index": int(row["index"]), "letters": "".join(k for k, _ in opts)})


def _ai2d(row: dict) -> EvalItem:
    options = list(row["options"])
    lines = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
    return EvalItem(str(row.get("__index__", "")), _image(row, "ai2d"), f"{row['question']}\n{lines}\n{MC_SUFFIX}",
                    [chr(65 + int(row["answer"]))])


def _gqa(row: dict) -> EvalItem:
    return EvalItem(str(row["id"]), _image(row, "gqa"), f"{row['question']}\n{SHORT_SUFFIX}", [str(row["answer"])])


def _mmmu(row: dict) -> EvalItem:
    question = str(row["question"])
    qtype = str(row.get("question_type", "multiple-choice"))
    try:
        options = ast.literal_eval(str(row.get("options") or "[]"))
    except (ValueError, SyntaxError):
        raise BadRow(f"mmmu_val row {row.get('id')}: options is not a Python list string") from None
    letters = "".join(chr(65 + i) for i in range(len(options)))
    if qtype == "multiple-choice" and options:
        lines = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))
        prompt = f"{question}\n{lines}\n\n{MC_SUFFIX}"
    else:
        prompt = f"{question}\n\n{SHORT_SUFFIX}"
    tags = sorted(set(re.findall(r"<image (\d+)>", question + " " + " ".join(map(str, options)))), key=int)
    column = f"image_{tags[0]}" if tags else "image_1"
    image = _image(row, "mmmu_val", column) if row.get(column) is not None else None
    return EvalItem(str(row["id"]), image, prompt, [str(row["answer"])],
                    {"question_type": qtype, "letters": letters, "options": [str(o) for o in options]})


def _mmstar(row: dict) -> EvalItem:
    q = str(row["question"]).strip().replace(" Please answer yes or no.", "")
    return EvalItem(str(row["index"]), _image(row, "mmstar"), f"{q}\n{MC_SUFFIX[:-1]}", [str(row["answer"]).strip()],
                    {"l2_category": row.get("l2_category")})


def _scienceqa(row: dict) -> EvalItem:
    choices = list(row["choices"])
    lines = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    context = f"Context: {row['hint']}\n" if _has(row.get("hint")) else ""
    image = _image(row, "scienceqa_img") if row.get("image") is not None else None
    return EvalItem(str(row.get("__index__", "")), image, f"{context}{row['question']}\n{lines}\n{MC_SUFFIX}",
                    [chr(65 + int(row["answer"]))])


def _synthetic(name: str):
    def build(row: dict) -> EvalItem:
        return EvalItem(str(row["question_id"]), _image(row, name), str(row["question"]),
                        [str(a) for a in row["answers"]])
    return build


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
    BenchmarkSpec("textvqa_val", ("question_id", "question", "answers", "image"), "exact_match", 16,
                  _textvqa, lambda p, item: vqa_accuracy(p, item.answers)),
    BenchmarkSpec("mmbench_en_dev", ("index", "question", "hint", "A", "B", "answer", "image"), "circular_accuracy", 16,
                  _mmbench, lambda p, item: float(extract_mcq_answer(p, item.meta["letters"] or "ABCD")
                                                  == item.answers[0]), _mmbench_aggregate),
    BenchmarkSpec("ai2d", ("question", "options", "answer", "image"), "exact_match", 16, _ai2d, _ai2d_score),
    BenchmarkSpec("gqa", ("id", "question", "answer", "image"), "exact_match", 16, _gqa, _first(exact_match)),
    BenchmarkSpec("mmmu_val", ("id", "question", "options", "answer", "question_type", "image_1"), "mmmu_acc", 128,
                  _mmmu, _mmmu_score),
    BenchmarkSpec("mmstar", ("index", "question", "answer", "image", "l2_category"), "average", 16,
                  _mmstar, _first(multiple_choice_accuracy), _mmstar_aggregate),
    BenchmarkSpec("scienceqa_img", ("question", "choices", "answer", "image"), "exact_match", 16,
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


def aggregate(name: str, scores: list[float], evaluated: list[EvalItem]) -> float:
    s = spec(name)
    if s.aggregate is not None:
        return s.aggregate(scores, evaluated)
    return sum(scores) / max(1, len(scores))


__all__ = ["EvalItem", "ImageCell", "BadRow", "build_items", "image_cell", "BenchmarkSpec", "BENCHMARK_SPECS", "BENCHMARKS", "spec", "items", "aggregate",
           "extract_mcq_answer", "multiple_choice_accuracy", "decode_image_cell"]
