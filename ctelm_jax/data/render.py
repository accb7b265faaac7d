"""Record -> structured fields (age bounds, sex, key criteria) and the canonical compact text that ELMs learn to write.

Age bounds are whole-or-fractional years of age, inclusive: "18 years or older" -> min 18, "under 18" / "< 18 years"
-> max 17 (one unit less), "over 18" / "> 18" -> min 18 (common usage means adults). Bounds stated in the exclusion
criteria are inverted ("Exclusion: age < 18" -> min 18). When several bounds are stated the most permissive wins
(lowest minimum, highest maximum; a maximum below some stated minimum belongs to a cohort and is dropped). Numbers
count as ages only with an age cue ("age"/"aged", "years of age"/"old", a person noun, or the item starting with the
bound), never after duration cues ("within", "history", "for patients", "since"); clauses about childbearing
potential or contraception are not read.
Sex is "female"/"male" only on a positive, unconditional cue (an explicit "Sex: Female", women as the enrolled
subjects, conditions that are all female-specific) with no cue for the other sex; otherwise "all".
Structured values imported from ClinicalTrials.gov (`min_age_years`, `max_age_years`, `sex`) take precedence.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

SEXES: tuple[str, ...] = ("all", "female", "male")
LIST_SEP = "; "
MAX_ITEM_CHARS = 100
MAX_ITEMS = 8
MAX_NAMES = 5
# Concept thresholds (years). 65 is the usual "older adult" cut-off, but in the shipped corpus only 32 trials set a
# minimum age >= 65 against 58 at >= 60 (of 4,466), so 60 keeps the concept learnable.
OLDER_ADULT_MIN_AGE = 60.0
ADULT_AGE = 18.0


@dataclasses.dataclass(frozen=True)
class TrialFields:
    """The structured view of a trial that renderings, tasks and evaluations share."""

    nctid: str
    phase: str
    status: str
    conditions: tuple[str, ...]
    interventions: tuple[str, ...]
    min_age: float | None
    max_age: float | None
    sex: str
    inclusion: tuple[str, ...]
    exclusion: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------------------
# criteria text -> sections and items

_INCL_HEAD = re.compile(r"^\s*(?:[-*\d.)]+\s*)?(?:key|main|major|primary|general|subject|patient|other)?\s*"
                        r"inclusions?(?:\s+criteria)?(?:\s*\([^)]*\))?\s*(?:include)?\s*:?\s*$", re.I)
_EXCL_HEAD = re.compile(r"^\s*(?:[-*\d.)]+\s*)?(?:key|main|major|primary|general|subject|patient|other)?\s*"
                        r"exclusions?(?:\s+criteria)?(?:\s*\([^)]*\))?\s*(?:include)?\s*:?\s*$", re.I)
_BULLET = re.compile(r"^(?:[-–•*·]+\s*|\(?\d{1,2}[.)](?=\s|$)\s*|\(?[a-zA-Z][.)]\s+|\(?[ivx]{1,4}[.)]\s+)")
_AGE_HEADER = re.compile(r"^(?:age|sex|gender)\b", re.I)
_PDQ_HEADER = re.compile(r"(?:age|sex|gender|performance status|life expectancy|hematopoietic|hepatic|renal|"
                         r"cardiovascular|pulmonary|other|immunologic|neurologic|menopausal status|biologic therapy|"
                         r"chemotherapy|endocrine therapy|radiotherapy|surgery)", re.I)


def _headed_items(criteria: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Inclusion and exclusion items of a criteria text as (header, text): bullets or paragraphs, each under the
    latest short header ("Age:", "DISEASE CHARACTERISTICS:"), "" if none."""
    inclusion: list[tuple[str, str]] = []
    exclusion: list[tuple[str, str]] = []
    target, current, header = inclusion, [], ""

    def flush() -> None:
        nonlocal header
        text = " ".join(current).strip()
        current.clear()
        if not text:
            return
        if (text.endswith(":") and len(text) < 60) or _PDQ_HEADER.fullmatch(text):
            header = text.rstrip(":") if len(text) < 40 else ""
            return
        target.append((header, text))
        if _AGE_HEADER.match(header):  # "Age:" heads one item
            header = ""

    for line in criteria.splitlines():
        s = line.strip()
        if not s:
            flush()
            continue
        if _INCL_HEAD.match(s) or _EXCL_HEAD.match(s):
            flush()
            target, header = (inclusion if _INCL_HEAD.match(s) else exclusion), ""
            continue
        bullet = _BULLET.match(s)
        if bullet:
            flush()
            s = s[bullet.end():].strip()
        if s:
            current.append(s)
    flush()
    return inclusion, exclusion


def _join(item: tuple[str, str]) -> str:
    """ "header: text", or the text alone."""
    return f"{item[0]}: {item[1]}" if item[0] else item[1]


def sections(criteria: str) -> tuple[list[str], list[str]]:
    """Inclusion and exclusion items of a criteria text, each prefixed by its short header if any ("Age: 18-65")."""
    inclusion, exclusion = _headed_items(criteria)
    return [_join(i) for i in inclusion], [_join(i) for i in exclusion]


# ----------------------------------------------------------------------------------------------------------------
# age bounds

_PHRASES = [  # normalised to comparison symbols, in this order; "⊒"/"⊑" are postfix (">=/<= the number before")
    (r"(?:,? ?(?:and|or) (?:older|over|above|greater|more|up|upward|upwards)|\+)(?![\w-]| than)", " ⊒"),
    (r"(?:,? ?(?:and|or) (?:younger|less|under|below))(?![\w-]| than)", " ⊑"),
    (r"≥|≧|=>|> ?or ?=|> ?/ ?=|> ?=|(?:above|over|greater|more|older) or equal(?: to)?|"
     r"greater than or equal(?: to)?|more than or equal to|equal (?:to )?or (?:greater|more|older) than|"
     r"at least|minimum(?: age)?(?: of)?|not younger than|no younger than|not less than|no less than", ">="),
    (r"≤|≦|=<|< ?or ?=|< ?/ ?=|< ?=|(?:below|under|less|younger) or equal(?: to)?|less than or equal(?: to)?|"
     r"equal to or (?:less|younger) than|(?:not|no) older than|(?:not|no) more than|not exceeding|"
     r"up to(?: and including)?|maximum(?: age)?(?: of)?", "<="),
    (r"older than|greater than|more than|over|above|exceeding", ">"),
    (r"younger than|less than|under|below", "<"),
]
_PHRASE_RE = [(re.compile(rf"(?<![\w-])(?:{p})(?![\w])" if p[0].isalpha() else p, re.I), s) for p, s in _PHRASES]
_DIGIT = re.compile(r"\d")
_NUM = r"(?<![\w.,])(\d{1,3}(?:\.\d+)?)(?![\d,]|\.\d|\s*%)"
_UNIT = r"(years?|yrs?\.?|y\.?o\.?|y/o|months?|mos?\.?|weeks?|wks?|days?)"
_RANGE = re.compile(rf"(?:between|from)?\s*(?:the ages? of\s*)?{_NUM}\s*{_UNIT}?\s*(?:old\s*|of age\s*)?"
                    rf"(?:-|–|to|and|through|until)\s*{_NUM}\s*{_UNIT}?", re.I)
_PRE = re.compile(rf"(>=|<=|>|<)\s*(?:the age of\s*)?{_NUM}\s*{_UNIT}?", re.I)
_BARE = re.compile(rf"{_NUM}\s*(years?)\s*(?:of age|old)\b", re.I)
_POST = re.compile(rf"{_NUM}\s*{_UNIT}?\s*(?:of age|old|-old|of age at [\w ]+?)?\s*([⊒⊑])", re.I)
_SUFFIX_CUE = re.compile(r"^\s*(?:of age|old|-old|\(?y/?o\b|at (?:the time of )?(?:screening|enrol|entry|consent|"
                         r"randomi|inclusion|baseline|visit|the time)|inclusive)", re.I)
_AGE_WORD = re.compile(r"(?<!childbearing )(?<!child-bearing )(?<!gestational )(?<!bone )\bage[sd]?\b"
                       r"(?![- ]related|[- ]appropriate|[- ]adjusted|[- ]matched|[- ]specific)", re.I)
_PERSON = re.compile(r"\b(?:men|women|males?|females?|adults?|subjects?|patients?|participants?|volunteers?|"
                     r"children|individuals?|persons?|people|boys?|girls?|infants?|adolescents?)\b", re.I)
_NOT_ENTRY_AGE = re.compile(r"\b(?:for|if|when|within|before|after|since|prior|onset|diagnos\w*|relatives?|"
                            r"history|past|last|during|sibling|family|treated|duration|expectancy|death|died)\b"
                            r"\W*(?:\w+\W+){0,5}$", re.I)
_DURATION_AFTER = re.compile(r"^\s*(?:since|ago|after|before|prior|elapsed|have elapsed|from|of (?:follow|treatment|"
                             r"therapy|disease|diagnosis|smoking)|duration|post|following)\b", re.I)
_CONDITIONAL_AGE = re.compile(r"child-? ?bearing|potential|pregnancy test|contracept", re.I)
_EXCL_PREFIX = re.compile(r"^(?:age\w*|subjects?|patients?|participants?|individuals?|persons?|people|children|men|"
                          r"women|males?|females?|those|anyone|who|are|is|be|of|an?|the|and|or|[\s:,.()])*$", re.I)


def _normalise(text: str) -> str:
    """Comparison phrases in `text` replaced by symbols, whitespace collapsed."""
    text = re.sub(r"\s+", " ", text)
    for pattern, symbol in _PHRASE_RE:
        text = pattern.sub(symbol, text)
    return text


def _years(value: str, unit: str | None) -> float:
    """A number with a unit (default years) in years."""
    u = (unit or "y").lower()
    scale = 12.0 if u.startswith("mo") else 52.0 if u.startswith("w") else 365.0 if u.startswith("d") else 1.0
    return round(float(value) / scale, 2)


def _unit_step(unit: str | None) -> float:
    """One unit of `unit` in years (for strict bounds)."""
    return _years("1", unit)


def _near(pattern: re.Pattern, text: str, end: int, width: int) -> bool:
    """Whether `pattern` occurs in the `width` characters of `text` before `end` (word boundaries see the context)."""
    return pattern.search(text, max(0, end - width), end) is not None


def _age_cue(text: str, start: int, end: int, unit: str | None, item_start: int) -> bool:
    """Whether the bound at text[start:end] is an age of the enrolled person rather than a duration or a score."""
    after = text[end:]
    if _near(_NOT_ENTRY_AGE, text, start, 40) or _DURATION_AFTER.match(after):
        return False
    if not unit:
        return _near(_AGE_WORD, text, start, 12) or re.match(r"\s*(?:of age|old)\b", after) is not None
    if _SUFFIX_CUE.match(after) or re.match(r"y\.?/?o", unit, re.I):
        return True
    if _near(_AGE_WORD, text, start, 30):
        return True
    return unit[0] in "yY" and (start <= item_start + 2 or _near(_PERSON, text, start, 30))


def _bounds(item: str, excluded: bool) -> tuple[list[float], list[float]]:
    """Lower and upper age bounds stated in one criteria item (inverted for exclusion items); clauses about women of
    childbearing potential, pregnancy tests or contraception are not read."""
    lower: list[float] = []
    upper: list[float] = []
    if not _DIGIT.search(item):
        return lower, upper
    text = _normalise(item)
    header = re.match(r"^(?:age|ages|aged)\b\s*:?\s*", text, re.I)
    for i, clause in enumerate(re.split(r"(?<=[.;])\s+", text)):
        if not _CONDITIONAL_AGE.search(re.sub(r"\([^()]*\)", "", clause)):
            _clause_bounds(clause, excluded, header.end() if header and i == 0 else 0, lower, upper)
    return lower, upper


def _clause_bounds(text: str, excluded: bool, item_start: int, lower: list[float], upper: list[float]) -> None:
    """Appends the age bounds stated in one normalised clause to `lower` / `upper`."""
    used: list[tuple[int, int]] = []
    found = len(lower) + len(upper)

    def free(a: int, b: int) -> bool:
        return all(b <= u or a >= v for u, v in used)

    def excluded_subject(start: int) -> bool:  # the clause is about the person's age: "Age < 18", "Under 18 years"
        return bool(_EXCL_PREFIX.match(text[:start]) or (start <= 30 and _near(_AGE_WORD, text, start, 12)))

    for m in _RANGE.finditer(text):
        lo, u1, hi, u2 = m.groups()
        unit = u2 or u1
        if _years(lo, u1 or u2) >= _years(hi, unit) or not _age_cue(text, m.start(1), m.end(), unit, item_start):
            continue
        used.append((m.start(1), m.end()))
        if not excluded:
            lower.append(_years(lo, u1 or u2))
            upper.append(_years(hi, unit))
    for m in _PRE.finditer(text):
        op, value, unit = m.groups()
        if not free(m.start(), m.end()) or not _age_cue(text, m.start(), m.end(), unit, item_start):
            continue
        if excluded and not excluded_subject(m.start()):
            continue
        used.append((m.start(), m.end()))
        _add(op, _years(value, unit), _unit_step(unit), excluded, lower, upper)
    for m in _POST.finditer(text):
        value, unit, post = m.groups()
        if not free(m.start(), m.end()) or _near(_NOT_ENTRY_AGE, text, m.start(), 40):
            continue
        if not ((unit and unit[0] in "yY") or _age_cue(text, m.start(), m.end(), unit, item_start)):
            continue
        if excluded and not excluded_subject(m.start()):
            continue
        used.append((m.start(), m.end()))
        _add(">=" if post == "⊒" else "<=", _years(value, unit), _unit_step(unit), excluded, lower, upper)
    if not excluded and len(lower) + len(upper) == found:  # "Must be 18 years of age" states a minimum
        for m in _BARE.finditer(text):
            if free(m.start(), m.end()) and not _near(_NOT_ENTRY_AGE, text, m.start(), 40):
                lower.append(_years(m.group(1), m.group(2)))


def _add(op: str, value: float, step: float, excluded: bool, lower: list[float], upper: list[float]) -> None:
    """Records the bound `op value` (or its complement when the item excludes it)."""
    if excluded:  # excluding "< 18" admits ">= 18"; excluding "<= 17" admits ">= 18"; excluding "> 75" admits "<= 75"
        op = {">=": "<", ">": "<=", "<=": ">", "<": ">="}[op]
        value = value + step if op == ">" else value - step if op == "<" else value
        op = op[0] + "="
    if op.startswith(">"):
        lower.append(value)
    else:
        upper.append(round(value - step, 2) if op == "<" else value)


def age_bounds(inclusion: Sequence[str], exclusion: Sequence[str] = ()) -> tuple[float | None, float | None]:
    """(min_age, max_age) in years stated by the criteria items, None where unstated."""
    lower: list[float] = []
    upper: list[float] = []
    for items, excluded in ((inclusion, False), (exclusion, True)):
        for item in items:
            lo, hi = _bounds(item, excluded)
            lower += lo
            upper += hi
    lo = min(lower) if lower else None
    hi = max(upper) if upper else None
    if hi is not None and any(bound > hi for bound in lower):  # an open-ended cohort above every upper bound
        hi = None
    return lo, hi


# ----------------------------------------------------------------------------------------------------------------
# sex

_BOTH = re.compile(r"\b(?:(?:males?|men|man|boys?)\s*(?:and|or|&|/|,)\s*(?:females?|women|woman|girls?)|"
                   r"(?:females?|women|woman|girls?)\s*(?:and|or|&|/|,)\s*(?:males?|men|man|boys?)|"
                   r"both (?:sexes|genders)|either (?:sex|gender)|all (?:sexes|genders)|any (?:sex|gender)|"
                   r"(?:sex|gender)\s*:\s*(?:all|both|not specified|any|male (?:and|or) female))\b", re.I)
_SEX_HEADER = re.compile(r"\b(?:sex|gender)\s*:\s*(female|male|women|men)(?: only)?\b", re.I)
_FEMALE = re.compile(r"\b(?:women|woman|females?|girls?|ladies|post-?menopausal|pre-?menopausal|peri-?menopausal|"
                     r"pregnant|pregnanc(?:y|ies)|nulliparous|nulliparity|primiparous|parturients?|"
                     r"menstruating)\b", re.I)
_MALE = re.compile(r"\b(?:men|man|males?|boys?)\b", re.I)
_FEMALE_CONDITION = re.compile(r"\b(?:women|female|ovar(?:y|ies|ian)|uter(?:us|ine)|endometri\w*|vagin\w*|vulv\w*|"
                               r"cervi(?:x|cal) (?:cancer|carcinoma|intraepithelial|dysplasia|neoplas\w*)|"
                               r"breast (?:cancer|carcinoma|neoplasms?)|pre-?eclampsia|c(?:a)?esarean|postpartum|"
                               r"post-?menopaus\w*|menopaus\w*|pregnan\w*|labou?r|polycystic ovary|"
                               r"infertility, female)\b", re.I)
_MALE_CONDITION = re.compile(r"\b(?:men|male|prostat(?:e|ic)|erectile|testic\w*|penile|infertility, male)\b", re.I)
_CONDITIONAL = re.compile(r"child-? ?bearing|potential|contracept|partner|"
                          r"(?:if|in|for) (?:females?|males?|a woman|a man|women|men)\b|except|negative|sexually|"
                          r"pregnancy test|non-?pregnant|not pregnant|(?:must|should|will) (?:agree|use|be willing)|"
                          r"birth control|lactat|breast-?feed|nursing|sterile|steriliz", re.I)
_SEX_ONLY_ITEM = re.compile(r"^\W*(?:healthy )?(?:(females?|women|woman)|(males?|men|man))(?: (?:patients|subjects|"
                            r"volunteers|participants))?\W*$", re.I)


def sex_of(inclusion: Sequence[str], exclusion: Sequence[str] = (), conditions: Sequence[str] = ()) -> str:
    """"female", "male" or "all": who may enrol, from explicit statements, subject nouns, or conditions that are all
    sex-specific."""
    female = male = False
    for item in inclusion:
        if _BOTH.search(item):
            return "all"
        header = _SEX_HEADER.search(item)
        if header:
            return "female" if header.group(1).lower() in ("female", "women") else "male"
        if _CONDITIONAL.search(item):
            continue
        female |= bool(_FEMALE.search(item))
        male |= bool(_MALE.search(item))
    for item in exclusion:  # "Exclusion: Men" leaves women only
        only = _SEX_ONLY_ITEM.match(item)
        if only:
            male |= bool(only.group(1))
            female |= bool(only.group(2))
    if conditions and all(_FEMALE_CONDITION.search(c) for c in conditions):
        female = True
    if conditions and all(_MALE_CONDITION.search(c) for c in conditions):
        male = True
    return "female" if female and not male else "male" if male and not female else "all"


# ----------------------------------------------------------------------------------------------------------------
# record -> fields -> text

_BOILERPLATE = re.compile(r"informed consent|comply|complian|willing|able to (?:understand|read|give|provide|sign)|"
                          r"^.{0,60}\bthe following\b.{0,40}$|"
                          r"^(?:none|not specified|see (?:above|disease characteristics))\W*$", re.I)


def _clean(text: str, limit: int = MAX_ITEM_CHARS) -> str:
    """One-line, list-safe, shortened text: brackets dropped, ';' -> ',', cut at a clause or word under `limit`."""
    text = re.sub(r"\([^()]*\)|\[[^\[\]]*\]", "", text)
    text = re.sub(r"\s+", " ", text.replace(";", ",")).strip(" .,:-")
    text = re.sub(r"\s+([,.])", r"\1", text)
    if len(text) > limit:
        cut = text[:limit + 1]
        clause = max(cut.rfind(", "), cut.rfind(". "), cut.rfind(" - "))
        text = cut[:clause] if clause > limit // 2 else cut.rsplit(" ", 1)[0]
        if text.count("(") > text.count(")"):
            text = text[:text.rfind("(")]
        text = text.rstrip(" .,:-")
    return text


def _names(values: Sequence[str]) -> tuple[str, ...]:
    """Distinct (case-insensitive) cleaned names, at most MAX_NAMES."""
    out: list[str] = []
    for value in values:
        name = _clean(value, 60)
        if name and name.lower() not in {o.lower() for o in out}:
            out.append(name)
    return tuple(out[:MAX_NAMES])


_CAPS_HEADER = re.compile(r"^(?:[A-Z][A-Z /&-]{3,}:\s*)+")


def _key_items(headed: Sequence[tuple[str, str]], excluded: bool) -> tuple[str, ...]:
    """Informative items (headers dropped), shortened: no consent/compliance boilerplate, no statement of age or sex."""
    out: list[str] = []
    for header, body in headed:
        item = _join((header, body))
        if _BOILERPLATE.search(item) or _CONDITIONAL_AGE.search(item) or _AGE_HEADER.match(item) or \
                _SEX_ONLY_ITEM.match(item):
            continue
        lo, hi = _bounds(item, excluded)
        if lo or hi or _BOTH.search(item):
            continue
        text = _clean(_CAPS_HEADER.sub("", body))
        if len(text) >= 3 and text.lower() not in {o.lower() for o in out}:
            out.append(text)
        if len(out) == MAX_ITEMS:
            break
    return tuple(out)


def fields(record: Mapping) -> TrialFields:
    """The structured fields of a corpus record (structured age/sex from ClinicalTrials.gov preferred when present)."""
    headed_inclusion, headed_exclusion = _headed_items(record["criteria"])
    inclusion, exclusion = [_join(i) for i in headed_inclusion], [_join(i) for i in headed_exclusion]
    if "min_age_years" in record or "max_age_years" in record:
        lo, hi = record.get("min_age_years"), record.get("max_age_years")
    else:
        lo, hi = age_bounds(inclusion, exclusion)
    sex = record["sex"] if record.get("sex") in SEXES else sex_of(inclusion, exclusion, record["diseases"])
    return TrialFields(
        nctid=record["nctid"], phase=_clean(record["phase"], 40).lower(), status=_clean(record["status"], 40).lower(),
        conditions=_names(record["diseases"]), interventions=_names(record["drugs"]), min_age=_canonical_age(lo),
        max_age=_canonical_age(hi), sex=sex,
        inclusion=_key_items(headed_inclusion, False), exclusion=_key_items(headed_exclusion, True))


def _age_text(years: float) -> str:
    """Years as "18 years", "6 months" (under 2 years and not whole) or "1 year"."""
    if years != int(years) and years < 2:
        months = round(years * 12)
        return f"{months} month{'s' if months != 1 else ''}"
    value = f"{years:g}"
    return f"{value} year{'s' if value != '1' else ''}"


def _canonical_age(years: float | None) -> float | None:
    """`years` as its rendering reads back (whole months under 2 years); 0 (from birth) is no bound."""
    if years is None:
        return None
    value = _parse_age(_age_text(years))
    return value or None


def ages_text(min_age: float | None, max_age: float | None) -> str:
    """The age range as text: "18 to 65 years", "18 years and older", "up to 17 years" or "not stated"."""
    if min_age is not None and max_age is not None:
        lo, hi = _age_text(min_age), _age_text(max_age)
        if lo.split()[1].rstrip("s") == hi.split()[1].rstrip("s") == "year":
            return f"{lo.split()[0]} to {hi}"
        return f"{lo} to {hi}"
    if min_age is not None:
        return f"{_age_text(min_age)} and older"
    if max_age is not None:
        return f"up to {_age_text(max_age)}"
    return "not stated"


_AGE_VALUE = re.compile(r"^(\d+(?:\.\d+)?) (years?|months?)$")


def _parse_age(text: str) -> float | None:
    """Years of "18 years" / "6 months", None if malformed."""
    m = _AGE_VALUE.match(text.strip())
    if not m:
        return None
    return _years(m.group(1), m.group(2))


def parse_ages(text: str) -> tuple[float | None, float | None] | None:
    """Inverse of `ages_text`; None if `text` is not one of its forms."""
    text = text.strip()
    if text == "not stated":
        return None, None
    if text.endswith(" and older"):
        lo = _parse_age(text[:-len(" and older")])
        return None if lo is None else (lo, None)
    if text.startswith("up to "):
        hi = _parse_age(text[len("up to "):])
        return None if hi is None else (None, hi)
    if " to " in text:
        lo_text, hi_text = text.split(" to ", 1)
        hi = _parse_age(hi_text)
        lo = _parse_age(lo_text if " " in lo_text else f"{lo_text} years")
        return None if lo is None or hi is None else (lo, hi)
    return None


def _line(name: str, values: Sequence[str]) -> str:
    """One "Name: a; b" line."""
    return f"{name}: {LIST_SEP.join(values)}"


def render_fields(f: TrialFields, max_chars: int = 600) -> str:
    """Canonical one-line-per-field text of `f`, within `max_chars`: criteria items are cut first (each list keeps a
    prefix), then names."""
    conditions, interventions = list(f.conditions) or ["not stated"], list(f.interventions) or ["not stated"]

    def text() -> str:
        return "\n".join([f"Phase: {f.phase}", _line("Conditions", conditions), _line("Interventions", interventions),
                          f"Ages: {ages_text(f.min_age, f.max_age)}", f"Sex: {f.sex}"]
                         + ([_line("Inclusion", inclusion)] if inclusion else [])
                         + ([_line("Exclusion", exclusion)] if exclusion else []) + [f"Status: {f.status}"])

    inclusion: list[str] = []
    exclusion: list[str] = []
    while len(text()) > max_chars and max(len(conditions), len(interventions)) > 1:
        (conditions if len(conditions) >= len(interventions) else interventions).pop()
    pending = [list(f.inclusion), list(f.exclusion)]
    while any(pending):  # alternate inclusion / exclusion items; a list stops at its first item that does not fit
        for bucket, items in zip((inclusion, exclusion), pending):
            if items:
                bucket.append(items.pop(0))
                if len(text()) > max_chars:
                    bucket.pop()
                    items.clear()
    return text()


def render_text(record: Mapping, max_chars: int = 600) -> str:
    """Canonical compact text of a corpus record (see `render_fields`)."""
    return render_fields(fields(record), max_chars)


_LINE_NAMES = ("Phase", "Conditions", "Interventions", "Ages", "Sex", "Inclusion", "Exclusion", "Status")


def field_lines(text: str) -> dict[str, str]:
    """The value of each rendering line ("Name: value", a known name, a non-empty value) of a text, the first one of
    each name; other lines are skipped (the lenient reading of a cut or malformed rendering)."""
    values: dict[str, str] = {}
    for line in text.strip().split("\n"):
        name, sep, value = line.partition(": ")
        if sep and name in _LINE_NAMES and name not in values and value.strip():
            values[name] = value.strip()
    return values


def list_items(value: str | None) -> tuple[str, ...]:
    """The items of a list line's value ("a; b"); none for a missing line or "not stated"."""
    return () if value is None or value == "not stated" else tuple(v.strip() for v in value.split(";"))


def parse_text(text: str) -> TrialFields | None:
    """Fields of a rendering (nctid ""), or None if it is not well-formed: every required line once, in order."""
    values: dict[str, str] = {}
    order: list[str] = []
    for line in text.strip().split("\n"):
        name, sep, value = line.partition(": ")
        if not sep or name not in _LINE_NAMES or name in values or not value.strip():
            return None
        values[name] = value.strip()
        order.append(name)
    required = [n for n in _LINE_NAMES if n not in ("Inclusion", "Exclusion")]
    if any(n not in values for n in required) or order != [n for n in _LINE_NAMES if n in values]:
        return None
    ages = parse_ages(values["Ages"])
    if ages is None or values["Sex"] not in SEXES:
        return None
    return TrialFields(nctid="", phase=values["Phase"], status=values["Status"],
                       conditions=list_items(values["Conditions"]), interventions=list_items(values["Interventions"]),
                       min_age=ages[0], max_age=ages[1], sex=values["Sex"],
                       inclusion=list_items(values.get("Inclusion")), exclusion=list_items(values.get("Exclusion")))


# ----------------------------------------------------------------------------------------------------------------
# concepts

def is_older_adult(f: TrialFields) -> bool:
    """Enrols only older adults: minimum age >= OLDER_ADULT_MIN_AGE."""
    return f.min_age is not None and f.min_age >= OLDER_ADULT_MIN_AGE


def is_pediatric(f: TrialFields) -> bool:
    """Enrols only children: maximum age < 18."""
    return f.max_age is not None and f.max_age < ADULT_AGE


def is_female_only(f: TrialFields) -> bool:
    """Enrols women only."""
    return f.sex == "female"


def is_male_only(f: TrialFields) -> bool:
    """Enrols men only."""
    return f.sex == "male"


CONCEPTS = {"older patients": is_older_adult, "children": is_pediatric, "women only": is_female_only,
            "men only": is_male_only}
_SEX_WORDS = re.compile(r"\b(?:women|woman|females?|girls?|men|man|males?|boys?|post-?menopausal|pre-?menopausal|"
                        r"pregnan\w*|mothers?)\b", re.I)
_AGE_WORDS = re.compile(r"\b(?:age[sd]?|years? old|children|child|pediatric|paediatric|infants?|adolescents?|adults?|"
                        r"elderly|older|geriatric)\b", re.I)


def edit_fields(f: TrialFields, concept: str, direction: int) -> TrialFields:
    """`f` with `concept` (a CONCEPTS key) made true (direction +1) or false (-1); criteria items that would contradict
    the edit (mentions of sex, or of age) are dropped."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; known: {sorted(CONCEPTS)}")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 (add the concept) or -1 (remove it), got {direction!r}")
    lo, hi, sex = f.min_age, f.max_age, f.sex
    if concept == "older patients":
        if direction > 0:
            lo, hi = max(lo or 0.0, 65.0), (hi if hi is not None and hi > 65.0 else None)
        else:
            lo = ADULT_AGE if lo is None or lo >= OLDER_ADULT_MIN_AGE else lo
    elif concept == "children":
        if direction > 0:
            lo, hi = (lo if lo is not None and lo < 17.0 else None), 17.0
        else:
            lo, hi = max(lo or 0.0, ADULT_AGE), (hi if hi is not None and hi >= ADULT_AGE else None)
            hi = hi if hi is None or hi >= lo else None
    else:
        target = "female" if concept == "women only" else "male"
        sex = target if direction > 0 else "all"
    words = _AGE_WORDS if concept in ("older patients", "children") else _SEX_WORDS
    return dataclasses.replace(
        f, min_age=lo, max_age=hi, sex=sex, inclusion=tuple(i for i in f.inclusion if not words.search(i)),
        exclusion=tuple(i for i in f.exclusion if not words.search(i)))


# Concept-offset targets (`tasks` "offset"): a trial moved by `strength` along a concept vector (`concepts.BUILTIN`).
MOVE_THRESHOLD = 0.5  # |strength| from which the sex and pediatric moves set the attribute
_OLDER_TARGET = (65.0, 100.0)  # (min, max) ages that the age move reaches at strength +1 (100: no upper bound)
_YOUNGER_TARGET = (ADULT_AGE, 40.0)  # ... and at strength -1


def _toward(value: float, target: float, amount: float, older: bool) -> float:
    """`value` moved `amount` (0..1) of the way to `target`, never against the move's direction."""
    moved = value + amount * (target - value)
    return max(value, moved) if older else min(value, moved)


def move_fields(f: TrialFields, concept: str, strength: float) -> TrialFields:
    """`f` moved in proportion to `strength` (-1..1) along a built-in concept vector: "age" moves both age bounds a
    |strength| share of the way to 65 and older (positive) or 18-40 (negative), in whole years; "sex" sets women
    only (positive) or men only (negative), "pediatric" children only or adults only, once |strength| reaches
    MOVE_THRESHOLD. Criteria items that mention what changed are dropped; strength 0 returns `f`."""
    if concept == "age":
        if strength == 0:
            return f
        older, amount = strength > 0, min(abs(float(strength)), 1.0)
        hi0 = f.max_age if f.max_age is not None else _OLDER_TARGET[1]
        lo0 = min(f.min_age if f.min_age is not None else ADULT_AGE, hi0)
        target = _OLDER_TARGET if older else _YOUNGER_TARGET
        lo, hi = (float(round(_toward(v, t, amount, older))) for v, t in zip((lo0, hi0), target))
        min_age = None if f.min_age is None and lo == lo0 else lo
        max_age = None if hi >= _OLDER_TARGET[1] else hi
        if (min_age, max_age) == (f.min_age, f.max_age):
            return f
        return dataclasses.replace(f, min_age=min_age, max_age=max_age,
                                   inclusion=tuple(i for i in f.inclusion if not _AGE_WORDS.search(i)),
                                   exclusion=tuple(i for i in f.exclusion if not _AGE_WORDS.search(i)))
    if concept not in ("sex", "pediatric"):
        raise ValueError(f"unknown concept {concept!r} to move along; known: age, pediatric, sex")
    if abs(strength) < MOVE_THRESHOLD:
        return f
    if concept == "sex":
        return edit_fields(f, "women only" if strength > 0 else "men only", 1)
    return edit_fields(f, "children", 1 if strength > 0 else -1)
