"""Combinatorial prompts use plain category words; disambiguated names stay as labels."""

from __future__ import annotations

from synthgen.prompts.combinatorial import CombinatorialSampler, load_vocabulary, prompt_word


def test_prompt_word_strips_the_sense_only():
    assert prompt_word("Crane (Wading Bird)") == "Crane"
    assert prompt_word("Maillot (Tights)") == "Maillot"
    assert prompt_word("Great White Shark") == "Great White Shark"


def test_shipped_vocabulary_prompts_have_no_disambiguators_but_labels_do():
    from synthgen.recipe import CombinatorialPrompts

    axes, _ = load_vocabulary("combinatorial")
    cats = axes["category"]
    shared = [c for c in cats if "(" in c]
    assert {"Crane (Wading Bird)", "Crane (Lifting Device)", "Cardigan (Corgi)", "Maillot (Tights)"} <= set(shared)
    assert len(set(cats)) == len(cats) == 1000  # labels stay distinct
    sampler = CombinatorialSampler(CombinatorialPrompts(), 20_000, seed=0)
    records = sampler.records(0, 20_000)
    assert not any("(" in r.prompt for r in records)
    assert [r.prompt for r in records[:500]] == sampler.prompts_for(range(500))
    crane = [r for r in records if r.label_name and r.label_name.startswith("Crane (")]
    assert crane and all(r.prompt.startswith("Crane, ") for r in crane)
    assert len({r.label_name for r in crane}) == len({r.label for r in crane})
