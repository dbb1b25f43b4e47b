"""Answer metrics as lmms-eval computes them (see ../shared/BENCHMARKS.md), as plain functions."""

from __future__ import annotations

import re
import string
from typing import Any, Sequence

from rapidfuzz.distance import Levenshtein

_PUNCT = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """lmms-eval's generic ``exact_match`` (HF evaluate's): optional lowercasing and deletion of
    ``string.punctuation``, then equality. Neither side is stripped here: lmms-eval strips the model's
    response before scoring (the harness does too) and never the reference."""
    p, a = prediction, answer
    if ignore_case:
        p, a = p.lower(), a.lower()
    if ignore_punctuation:
        p, a = p.translate(_PUNCT), a.translate(_PUNCT)
    return float(p == a)


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA ANLS: 1 - min normalized Levenshtein over the answers, 0 below ``threshold``.

    Both sides are lowercased, stripped and whitespace-collapsed; the normalizer is
    the larger *raw* length (lmms-eval's quirk), 0 distance when both are empty. An empty
    ``answers`` scores 0 (lmms-eval's ``anls`` crashes there on ``min([])``)."""
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
    """ChartQA ``relaxed_correctness``: numbers within ``tolerance`` relative error, otherwise
    case-insensitive equality. The response is stripped (lmms-eval strips it before scoring); the
    reference is used as stored, as lmms-eval does."""
    p, a = prediction.strip(), answer
    pf, af = _to_float(p), _to_float(a)
    if pf is not None and af:
        return float(abs(pf - af) / abs(af) <= tolerance)
    return float(p.lower() == a.lower())


# ---------------------------------------------------------------- VQA accuracy (TextVQA)

# EvalAI's answer processor table (mmf's ``EvalAIAnswerProcessor``, as lmms-eval ships it), quirks
# included: keys with a capital I never match the lowercased text, "somebody'd" maps to
# "somebodyd", and some keys map to themselves.
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's "
    "howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd "
    "itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
    "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't "
    "shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've "
    "somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
    "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's "
    "somethingd=something'd somethingd've=something'd've something'dve=something'd've "
    "somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've "
    "therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll "
    "theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've "
    "werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd "
    "wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's "
    "whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't "
    "wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll "
    "yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've "
    "you'dve=you'd've youll=you'll youre=you're youve=you've"
).split())
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCT_VQA = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processor (TextVQA/VQAv2), step by step as lmms-eval runs it."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT_VQA:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, re.UNICODE)  # EvalAI passes re.UNICODE as ``count``: at most 32 periods go
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: mean over the answers of min(1, #other answers equal to the prediction / 3).
    An empty answer list scores 0 (lmms-eval's ``statistics.mean([])`` raises there)."""
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

_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# format -> priority: the highest priority wins, then the latest position
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: Sequence[str] | str | None = None) -> str:
    """lmms-eval's ``_task_utils/mcq_extract.extract_mcq_answer`` (MMStar, MMBench's static fallback).

    Every letter of ``choices`` (default A-H) found in one of nine formats is a candidate; the
    candidate of the highest-priority format wins, the latest one among equals. "" when none."""
    if not response or not response.strip():
        return ""
    letters = list(choices) if choices else list("ABCDEFGH")
    text = response.strip()
    for char in ",.!?;:'\"":  # one character after the other, as lmms-eval strips them
        text = text.strip(char)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for fmt, (pre, suf) in (("parentheses", ("(", ")")), ("period", ("", ".")), ("colon", ("", ":")),
                            ("right_paren", ("", ")")), ("space", ("", " "))):
        for ch in letters:
            if pre + ch + suf in text:
                found.append((_PRIORITY[fmt], text.rfind(pre + ch + suf), ch))
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for ch in letters:
                pos = text.find(ch, at + len(phrase))
                if pos != -1:
                    found.append((_PRIORITY["phrase"], pos, ch))
    bare = text.strip()
    for ch in letters:
        if bare.startswith(ch) and (len(bare) == 1 or not bare[1].isalpha()):
            found.append((_PRIORITY["start"], 0, ch))
    for ch in letters:
        if bare.endswith(ch) and (len(bare) == 1 or not bare[-2].isalpha()):
            found.append((_PRIORITY["end"], len(text) - 1, ch))
    if not found:
        found = [(_PRIORITY["fallback"], text.rfind(ch), ch) for ch in letters if ch in text]
    if not found:
        return ""
    # a stable sort, descending on (priority, position), as lmms-eval's: the first of equals wins
    return sorted(found, key=lambda c: (c[0], c[1]), reverse=True)[0][2]


def multiple_choice_accuracy(prediction: str, answer: str, choices: str = "ABCD") -> float:
    """MMStar's ``exact_match``: ``extract_mcq_answer`` over A-D against the stripped, uppercased answer."""
    return float(extract_mcq_answer(prediction, choices) == answer.strip().upper())


_INFER_AFFIXES = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                  (":", ","), (":", "."), (":", ")"), (":", ")."))


def can_infer_option(answer: str, num_choice: int = 5) -> str | None:
    """MMBench's ``can_infer_option``: exactly one option letter (A-E) as a whitespace-separated
    token, bare or in one of twelve affixed forms ("B.", "(C)", ":D", ...). A bare "A" in an answer
    of more than three tokens may be the article, so it is not taken bare. None when nothing is."""
    letters = string.ascii_uppercase[:num_choice]
    if "Failed to obtain answer via API" in answer:
        return None
    tokens = [t.strip() for t in answer.split()]

    def count(pre: str = "", suf: str = "") -> int:
        return sum(pre + c + suf in tokens for c in letters)

    if count() == 1 and not ("A" in tokens and len(tokens) > 3):
        return next(c for c in letters if c in tokens)
    for pre, suf in _INFER_AFFIXES:
        if count(pre, suf) == 1:
            return next(c for c in letters if pre + c + suf in tokens)
    return None


def can_infer_text(answer: str, options: dict[str, str]) -> str | None:
    """MMBench's ``can_infer_text``: the one option whose lowercased text occurs in the lowercased
    answer (an empty option text occurs in every answer). None when zero or several do."""
    answer = answer.lower()
    hits = [k for k, v in options.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def mmbench_correct(prediction: str, answer: str, options: dict[str, str]) -> bool:
    """One MMBench row as lmms-eval's static evaluator judges it: ``can_infer`` (option letter,
    then option text); if it infers nothing, ``extract_mcq_answer`` over the row's options.
    ``options``: the row's A-D texts that are not null, as MMBench's ``build_choices``."""
    inferred = can_infer_option(prediction) or can_infer_text(prediction, options)
    if inferred:
        return inferred == answer
    extracted = extract_mcq_answer(prediction, sorted(options))
    return bool(extracted) and extracted == answer


# ---------------------------------------------------------------- MMMU (the official MMMU parsers)

def mmmu_parse_choice(response: str, letters: Sequence[str], options: Sequence[str]) -> str | None:
    """MMMU's ``parse_multi_choice_response``, except where it finds no candidate: there MMMU picks a
    random letter (Python's global ``random``), and this returns None so that the caller chooses."""
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    index2ans = dict(zip(letters, options))
    by_letter, bracketed = True, False
    cands = [c for c in letters if f"({c})" in response]
    if cands:
        bracketed = True
    if not cands:
        cands = [c for c in letters if f"{c} " in response]
    if not cands:
        cands = [c for c in letters if f"{c}." in response]
    if not cands and len(response.split()) > 5:
        cands = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
        by_letter = False
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if not by_letter:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in cands]
    elif bracketed:
        starts = [response.rfind(f"({c})") for c in cands]
    else:
        starts = [response.rfind(f" {c} ") for c in cands]
    return cands[starts.index(max(starts))]  # np.argmax: the first of the largest


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def mmmu_normalize(text: str) -> list[Any]:
    """MMMU's ``normalize_str``: a number becomes a float rounded to 2 places; other text is
    lowercased, and a single character is padded (" x" and "x ") to avoid trivial matches."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_NUMBER_PATTERNS = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"), re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),
                    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"))
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def mmmu_parse_open(response: str) -> list[Any]:
    """MMMU's ``parse_open_response``: the shortest tail after a key phrase of each line (the whole
    response when none), the numbers in them, all normalized. (MMMU also means to split at ". X"
    sentence ends, but it lowercases first, so only newlines split.)"""
    text = response.strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys: list[str] = []
    for i, line in enumerate(lines):
        indicators = _KEY_INDICATORS + (("=",) if i == len(lines) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in line:
                tail = line.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    if not keys:
        keys = [text]
    found = list(keys)
    for k in keys:
        for pattern in _NUMBER_PATTERNS:
            found.extend(pattern.findall(k))
    out: list[Any] = []
    for f in found:
        for v in mmmu_normalize(f):
            if v not in out:
                out.append(v)
    return out


def mmmu_open_correct(gold: str | Sequence[str], preds: Sequence[Any]) -> bool:
    """MMMU's ``eval_open``: a text candidate is right when it contains a normalized text answer, a
    number when it equals a normalized number answer."""
    golds: list[Any] = []
    for g in ([gold] if isinstance(gold, str) else gold):
        golds.extend(mmmu_normalize(g))
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


__all__ = ["exact_match", "anls", "relaxed_accuracy", "vqa_accuracy", "normalize_vqa_answer", "extract_mcq_answer",
           "multiple_choice_accuracy", "can_infer_option", "can_infer_text", "mmbench_correct", "mmmu_parse_choice",
           "mmmu_normalize", "mmmu_parse_open", "mmmu_open_correct", "CONTRACTIONS"]
