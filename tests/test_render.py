"""Age/sex extraction rules on real-style criteria snippets, the canonical rendering and its parser, concepts."""

import collections
import dataclasses

import pytest

from ctelm_jax.data import corpus, render


def _section(*inclusion: str, exclusion: tuple[str, ...] = ()) -> str:
    """A ClinicalTrials.gov-style criteria text with bulleted sections."""
    text = "        Inclusion Criteria:\n\n" + "".join(f"          -  {i}\n\n" for i in inclusion)
    if exclusion:
        text += "        Exclusion Criteria:\n\n" + "".join(f"          -  {e}\n\n" for e in exclusion)
    return text


AGES = [
    (_section("Age 18 years and older", exclusion=("Pregnancy",)), (18, None)),
    (_section("Male or female aged 18-65 years"), (18, 65)),
    (_section("Patients between 18 and 75 years of age"), (18, 75)),
    (_section("Age ≥ 65 years"), (65, None)),
    (_section("Children aged 6 to 17 years, inclusive"), (6, 17)),
    (_section("Under 18 years of age"), (None, 17)),  # strict upper bound: one unit less
    (_section("Aged greater than or equal to 20 years and less than 75 years"), (20, 74)),
    (_section("Asthma", exclusion=("Age < 18 years",)), (18, None)),  # exclusion bounds are inverted
    (_section("Dementia", exclusion=("Age <50 or >90",)), (50, 90)),
    (_section("Age: 18 to 65 years"), (18, 65)),
    ("PATIENT CHARACTERISTICS:\n\nAge:\n\n  -  18 and over\n\nPerformance status:\n\n  -  ECOG 0-2\n\n"
     "Life expectancy:\n\n  -  At least 3 months", (18, None)),  # NCI PDQ layout
    (_section("Between 30 months and 17 years of age"), (2.5, 17)),
    (_section("Infants 6 weeks to 6 months of age"), (0.12, 0.5)),
    (_section("Postmenopausal women 50 years or older"), (50, None)),
    (_section("Men and women 40-80 years old"), (40, 80)),
    (_section("Subjects must be 18 years of age."), (18, None)),  # a bare age reads as a minimum
    (_section("Age >= 18 years (>= 20 years in Japan)"), (18, None)),  # the most permissive bound wins
    # durations, scores and relatives' ages are not the enrolled person's age
    (_section("No malignancy within the past 5 years", "Smoking history of at least 10 pack years",
              "Life expectancy > 12 weeks", "Karnofsky ≥ 70% for patients > 16 years of age",
              "At least 2 weeks since prior chemotherapy", "ANC >= 1500/mm^3"), (None, None)),
    (_section("Atrial fibrillation", exclusion=("Family history of sudden death < 40 years of age",)), (None, None)),
    # known limitation, by design: clauses about childbearing potential are not read for ages
    (_section("Female participants of childbearing potential aged 18-45 must use contraception"), (None, None)),
]


@pytest.mark.parametrize("criteria, expected", AGES)
def test_age_bounds(criteria, expected):
    assert render.age_bounds(*render.sections(criteria)) == expected


SEXES = [
    (_section("Male or female, aged 18 or older"), [], "all"),
    (_section("Postmenopausal women with osteoporosis"), [], "female"),
    (_section("Healthy male subjects, 18 to 45 years of age"), [], "male"),
    (_section("Pregnant women at 24-28 weeks gestation"), [], "female"),
    (_section("Adults with asthma", "Women of childbearing potential must use contraception"), [], "all"),
    ("PATIENT CHARACTERISTICS:\n\nSex:\n\n  -  Female", [], "female"),
    (_section("Gender: Male or female subjects."), [], "all"),
    (_section("Adults with asthma", exclusion=("Pregnant or breastfeeding women",)), [], "all"),
    (_section("Healthy volunteers", exclusion=("Males",)), [], "female"),
    (_section("In men, normal testosterone levels", "Chronic low back pain"), [], "all"),
    (_section("Histologically confirmed adenocarcinoma"), ["prostate cancer"], "male"),
    (_section("Histologically confirmed adenocarcinoma"), ["breast cancer", "colorectal cancer"], "all"),
]


@pytest.mark.parametrize("criteria, conditions, expected", SEXES)
def test_sex(criteria, conditions, expected):
    inclusion, exclusion = render.sections(criteria)
    assert render.sex_of(inclusion, exclusion, conditions) == expected


def test_sections_split_inclusion_and_exclusion():
    inclusion, exclusion = render.sections(_section("Asthma for at least 1 year\n             with FEV1 < 80%",
                                                    exclusion=("Current smokers", "Pregnancy")))
    assert inclusion == ["Asthma for at least 1 year with FEV1 < 80%"]
    assert exclusion == ["Current smokers", "Pregnancy"]


@pytest.fixture(scope="module")
def all_fields():
    return [render.fields(r) for r in corpus.load_records()]


def test_render_parse_round_trip_on_corpus(all_fields):
    for f in all_fields:
        text = render.render_fields(f)
        assert len(text) <= 600
        parsed = render.parse_text(text)
        assert parsed is not None, text
        assert parsed.inclusion == f.inclusion[:len(parsed.inclusion)]  # criteria are cut, as prefixes
        assert parsed.exclusion == f.exclusion[:len(parsed.exclusion)]
        assert dataclasses.replace(parsed, nctid=f.nctid, inclusion=f.inclusion, exclusion=f.exclusion,
                                   conditions=f.conditions, interventions=f.interventions) == f
        assert parsed.conditions == f.conditions[:len(parsed.conditions)]
        assert parsed.interventions == f.interventions[:len(parsed.interventions)]


def test_render_text_format():
    record = {"nctid": "NCT1", "phase": "phase 2", "status": "completed", "why_stop": "",
              "diseases": ["asthma", "Asthma", "allergic rhinitis"], "drugs": ["budesonide; formoterol"],
              "criteria": _section("Age 18 to 65 years", "Asthma (GINA step 3) for at least 6 months",
                                   exclusion=("Current smokers", "Written informed consent"))}
    assert render.render_text(record) == (
        "Phase: phase 2\nConditions: asthma; allergic rhinitis\nInterventions: budesonide, formoterol\n"
        "Ages: 18 to 65 years\nSex: all\nInclusion: Asthma for at least 6 months\nExclusion: Current smokers\n"
        "Status: completed")
    short = render.render_text(record, max_chars=150)
    assert "Inclusion:" not in short and render.parse_text(short) is not None


@pytest.mark.parametrize("bad", ["", "Phase: phase 2", "Phase: phase 2\nConditions: a\nInterventions: b\nAges: soon\n"
                                 "Sex: all\nStatus: completed",
                                 "Conditions: a\nPhase: phase 2\nInterventions: b\nAges: not stated\nSex: all\n"
                                 "Status: completed",
                                 "Phase: phase 2\nConditions: a\nInterventions: b\nAges: not stated\nSex: both\n"
                                 "Status: completed"])
def test_parse_rejects_malformed(bad):
    assert render.parse_text(bad) is None


def test_field_lines_reads_a_malformed_text_leniently():
    text = "noise\nSex: female\nPhase: phase 3\nPhase: phase 1\nAges:\nConditions: a; b\nColour: red\nStatus:x"
    assert render.field_lines(text) == {"Sex": "female", "Phase": "phase 3", "Conditions": "a; b"}
    assert render.list_items("a; b ;c") == ("a", "b", "c")
    assert render.list_items("not stated") == () and render.list_items(None) == ()


@pytest.mark.parametrize("lo, hi, text", [(18, 65, "18 to 65 years"), (18, None, "18 years and older"),
                                          (None, 17, "up to 17 years"), (None, None, "not stated"),
                                          (0.5, 17, "6 months to 17 years"), (0.25, 1.5, "3 months to 18 months"),
                                          (1, None, "1 year and older")])
def test_ages_text_round_trip(lo, hi, text):
    assert render.ages_text(lo, hi) == text
    assert render.parse_ages(text) == (lo, hi)


def test_concepts_and_edits(all_fields):
    counts = collections.Counter()
    for f in all_fields:
        counts["women only"] += render.is_female_only(f)
        counts["men only"] += render.is_male_only(f)
        counts["min age >= 60"] += render.is_older_adult(f)
        counts["min age >= 65"] += f.min_age is not None and f.min_age >= 65
        counts["pediatric (max < 18)"] += render.is_pediatric(f)
        counts["age stated"] += f.min_age is not None or f.max_age is not None
    print(f"\nconcept counts over {len(all_fields)} trials: {dict(counts)}")
    assert 200 < counts["women only"] < 600 and 100 < counts["men only"] < 400
    assert 30 < counts["min age >= 60"] < 150 and 50 < counts["pediatric (max < 18)"] < 250

    adult = next(f for f in all_fields if f.min_age == 18 and f.max_age is None and f.sex == "all")
    for concept, has in render.CONCEPTS.items():
        added = render.edit_fields(adult, concept, +1)
        assert has(added) and not has(adult)
        removed = render.edit_fields(added, concept, -1)
        assert not has(removed)
        assert render.parse_text(render.render_fields(added)) is not None
    kid = render.edit_fields(adult, "children", +1)
    assert (kid.min_age, kid.max_age) == (None, 17)
    assert render.edit_fields(kid, "children", -1).min_age == 18
    women = render.TrialFields("NCT1", "phase 3", "completed", ("osteoporosis",), ("x",), 50, None, "female",
                               ("Postmenopausal women with osteoporosis", "T-score below -2.5"), ())
    assert render.edit_fields(women, "women only", -1).inclusion == ("T-score below -2.5",)  # contradicting item goes
    with pytest.raises(ValueError):
        render.edit_fields(adult, "tall people", 1)
