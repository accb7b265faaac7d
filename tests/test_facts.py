"""Fact-level scores of decoded trial texts (eval/facts.py) on hand-made texts with known answers."""

import math

import pytest

from ctelm_jax.eval import facts

TRUTH = ("Phase: phase 2\nConditions: Asthma; COPD\nInterventions: salbutamol\nAges: 18 to 65 years\nSex: all\n"
         "Inclusion: FEV1 below 80 percent; stable asthma for 6 months\nExclusion: current smoker; pregnancy\n"
         "Status: completed")


def test_perfect_text_scores_one_everywhere():
    s = facts.score(TRUTH, TRUTH)
    assert all(s[name] == 1.0 for name in facts.FIELDS)
    assert s["key_facts"] == 1.0 and s["conditions_f1"] == 1.0 and s["interventions_f1"] == 1.0
    assert s["ages_within"] == 1.0 and (s["logic_right"], s["logic_found"]) == (4, 4)
    # Case, whitespace and a final period do not matter; a paraphrased criteria item is still found.
    loose = TRUTH.replace("Asthma; COPD", "asthma;  copd.").replace("80 percent", "80 %").replace("phase 2", "Phase 2")
    s = facts.score(loose, TRUTH)
    assert s["key_facts"] == 1.0 and s["logic_found"] == 4 and s["logic_right"] == 4


def test_wrong_ages():
    near = facts.score(TRUTH.replace("18 to 65 years", "20 to 65 years"), TRUTH)
    assert near["ages"] == 0.0 and near["ages_within"] == 1.0 and near["key_facts"] == pytest.approx(5 / 6)
    far = facts.score(TRUTH.replace("18 to 65 years", "30 to 65 years"), TRUTH)
    assert far["ages"] == 0.0 and far["ages_within"] == 0.0
    # An open bound matches only an open bound, however close the number.
    open_end = facts.score(TRUTH.replace("18 to 65 years", "18 years and older"), TRUTH)
    assert open_end["ages"] == 0.0 and open_end["ages_within"] == 0.0
    assert facts.ages_within((None, 17.0), (None, 14.0)) and not facts.ages_within((0.5, 17.0), (None, 17.0))


def test_swapped_criteria_are_wrong_side():
    swapped = TRUTH.replace("Inclusion: FEV1 below 80 percent; stable asthma for 6 months\n"
                            "Exclusion: current smoker; pregnancy",
                            "Inclusion: current smoker; pregnancy\n"
                            "Exclusion: FEV1 below 80 percent; stable asthma for 6 months")
    s = facts.score(swapped, TRUTH)
    assert (s["logic_right"], s["logic_found"]) == (0, 4)
    assert s["key_facts"] == 1.0  # the key fields are untouched
    # One item moved to the other side: 3 of 4 right.
    one = TRUTH.replace("; stable asthma for 6 months", "")
    one = one.replace("pregnancy", "pregnancy; stable asthma for 6 months")
    s = facts.score(one, TRUTH)
    assert (s["logic_right"], s["logic_found"]) == (3, 4)
    both = TRUTH.replace("pregnancy", "pregnancy; stable asthma for 6 months")  # on both sides: a contradiction
    assert (facts.score(both, TRUTH)["logic_right"], facts.score(both, TRUTH)["logic_found"]) == (3, 4)
    drop = TRUTH.replace("Exclusion: current smoker; pregnancy\n", "")  # items the text does not state: not counted
    assert (facts.score(drop, TRUTH)["logic_right"], facts.score(drop, TRUTH)["logic_found"]) == (2, 2)


def test_terms_f1_and_wrong_fields():
    s = facts.score(TRUTH.replace("Asthma; COPD", "asthma; bronchitis; emphysema").replace("salbutamol", "placebo"),
                    TRUTH)
    assert s["conditions_f1"] == pytest.approx(2 * 1 / (3 + 2)) and s["conditions"] == 0.0
    assert s["interventions_f1"] == 0.0 and s["interventions"] == 0.0
    assert s["key_facts"] == pytest.approx(4 / 6)
    assert facts.item_f1(frozenset(), frozenset()) == 1.0 and facts.item_f1(None, frozenset()) == 0.0
    s = facts.score(TRUTH.replace("Sex: all", "Sex: women").replace("Status: completed", "Status: recruiting"), TRUTH)
    assert s["sex"] == 0.0 and s["status"] == 0.0  # "women" is not one of the rendering's sexes


@pytest.mark.parametrize("text", ["", "lorem ipsum dolor", "Phase:\nAges: whenever\nSex: sometimes\n: :",
                                  "Conditions: \nInclusion: ; ;"])
def test_garbage_scores_zero(text):
    s = facts.score(text, TRUTH)
    assert s["key_facts"] == 0.0 and s["conditions_f1"] == 0.0 and s["ages_within"] == 0.0
    assert s["logic_found"] == 0


def test_cut_text_scores_what_it_states():
    cut = "\n".join(TRUTH.split("\n")[:3])  # phase, conditions, interventions
    s = facts.score(cut, TRUTH)
    assert s["key_facts"] == pytest.approx(3 / 6) and s["ages"] == 0.0 and s["sex"] == 0.0
    # Out of order and with a repeated line: each line is read where it stands, the first of a name wins.
    shuffled = "Sex: all\nPhase: phase 2\nPhase: phase 3\nnoise\nStatus: completed"
    assert facts.score(shuffled, TRUTH)["key_facts"] == pytest.approx(3 / 6)


def test_fact_table_means_and_pooled_logic():
    garbage = "lorem ipsum"
    row = facts.fact_table([TRUTH, garbage], [TRUTH, TRUTH])
    assert row["key_facts"] == 0.5 and row["phase"] == 0.5 and row["n"] == 2
    assert row["logic"] == 1.0 and row["logic_n"] == 4  # the garbage text states no item: not counted
    none = facts.fact_table([garbage], [TRUTH])
    assert math.isnan(none["logic"]) and none["logic_n"] == 0
    with pytest.raises(ValueError, match="2 texts but 1"):
        facts.fact_table([TRUTH, TRUTH], [TRUTH])
