"""Answer metrics as lmms-eval computes them (see ../shared/BENCHMARKS.md), as plain functions."""

from __future__ import annotations

import re
import string
from typing import Sequence

from rapidfuzz.distance import Levenshtein

_PUNCT = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """lmms-eval's generic exact_match: optional lowercasing and punctuation deletion, then equality."""
    p, a = prediction.strip(), answer.strip()
    if ignore_case:
        p, a = p.lower(), a.lower()
    if ignore_punctuation:
        p, a = p.translate(_PUNCT), a.translate(_PUNCT)
    return float(p == a)


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA ANLS: 1 - min normalized Levenshtein over the answers, 0 below ``threshold``.

    Both sides are lowercased, stripped and whitespace-collapsed; the normalizer is
    the larger *raw* length (lmms-eval's quirk), 0 distance when both are empty."""
    if isinstance(answers, str):
        answers = [answers]
    prediction = prediction.strip()  # lmms-eval strips responses before scoring
    p = " ".join(prediction.lower().split())
    best = 1.0
    for gt in answers:
        g = " ".join(gt.strip().lower().split())
        denom = max(len(gt.upper()), len(prediction.upper()))
        nl = 0.0 if denom == 0 else Levenshtein.distance(g, p) / denom
        best = min(best, nl)
    score = 1.0 - best
    return 0.0 if score < threshold else score


# ---------------------------------------------------------------- ChartQA relaxed accuracy

def _to_float(text: str) -> float | None:
    """ChartQA's parse: a trailing % is stripped and divides by 100, else plain float()."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA: numbers within ``tolerance`` relative error, otherwise case-insensitive equality."""
    p, a = prediction.strip(), answer.strip()
    pf, af = _to_float(p), _to_float(a)
    if pf is not None and af:
        return float(abs(pf - af) / abs(af) <= tolerance)
    return float(p.lower() == a.lower())


# ---------------------------------------------------------------- VQA accuracy (TextVQA)

_CONTRACTION_FORMS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll we're we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're "
    "why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
# EvalAI maps spellings without (some) apostrophes back to the contraction. Its keys
# starting with a capital "I" (Im, Ive, Id've) never match lowercased text: left out.
CONTRACTIONS: dict[str, str] = {}
for _form in _CONTRACTION_FORMS:
    _parts = _form.split("'")
    CONTRACTIONS["".join(_parts)] = _form
    if len(_parts) == 3:  # couldn't've: also couldnt've and couldn'tve
        CONTRACTIONS[_parts[0] + _parts[1] + "'" + _parts[2]] = _form
        CONTRACTIONS[_parts[0] + "'" + _parts[1] + _parts[2]] = _form
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCT_VQA = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processor (TextVQA/VQAv2), step by step as lmms-eval runs it."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT_VQA:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, re.UNICODE)
    words = []
    for word in out.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: mean over the answers of min(1, #other answers equal to the prediction / 3)."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction.strip())
    gts = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- multiple choice

def extract_mcq_answer(response: str, choices: str = "ABCD") -> str | None:
    """lmms-eval's ``extract_mcq_answer`` (MMStar, MMBench static): priority-ranked letter patterns."""
    text = response.strip().strip(",.!?;:'\"")
    if not text:
        return None
    best: tuple[int, int, str] | None = None  # (priority, position, letter)
    letters = re.escape(choices)

    def consider(priority: int, pos: int, letter: str) -> None:
        nonlocal best
        if best is None or (priority, pos) > (best[0], best[1]):
            best = (priority, pos, letter.upper())

    m = re.match(rf"^([{letters}])(?:$|[\s.:),])", text)
    if m:
        consider(10, m.start(1), m.group(1))
    m = re.search(rf"(?:^|[\s(])([{letters}])$", text)
    if m:
        consider(9, m.start(1), m.group(1))
    for m in re.finditer(rf"(?:the\s+)?answer\s+is\s*:?\s*\(?([{letters}])\b", text, re.IGNORECASE):
        consider(7, m.start(1), m.group(1))
    for pattern, priority in ((rf"\(([{letters}])\)", 6), (rf"\b([{letters}])\.", 5), (rf"\b([{letters}]):", 4),
                              (rf"\b([{letters}])\)", 3), (rf"\b([{letters}]) ", 2)):
        for m in re.finditer(pattern, text):
            consider(priority, m.start(1), m.group(1))
    if best is None:
        for m in re.finditer(rf"\b([{letters}])\b", text):
            consider(0, m.start(1), m.group(1))
    return best[2] if best else None


def multiple_choice_accuracy(prediction: str, answer: str, choices: str = "ABCD") -> float:
    """Option-letter extraction (``extract_mcq_answer``) compared with the answer letter."""
    return float(extract_mcq_answer(prediction, choices) == answer.strip().upper())


__all__ = ["exact_match", "anls", "relaxed_accuracy", "vqa_accuracy", "normalize_vqa_answer", "extract_mcq_answer",
           "multiple_choice_accuracy"]
