"""The planted defects of tests/mutants.py: each one still applies to the code, and each one is caught by every
test named with it."""

import pytest

from mutants import MUTANTS, ROOT, mutated, run_mutants

ACTIVE = [mutant for mutant in MUTANTS if mutant.pending is None]


@pytest.fixture(scope="module")
def outcomes(request) -> dict:
    """The selected mutants, run once for the module, two at a time."""
    selected = [
        item.callspec.params["mutant"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_planted_defect_is_caught"
    ]
    return run_mutants(selected)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[mutant.name for mutant in MUTANTS])
def test_every_mutation_still_applies_to_the_code(mutant):
    original, text = mutated(mutant)
    assert text != original
    for test in mutant.tests:
        assert (ROOT / test.split("::")[0]).is_file(), test


@pytest.mark.parametrize("mutant", ACTIVE, ids=[mutant.name for mutant in ACTIVE])
def test_planted_defect_is_caught(outcomes, mutant):
    outcome = outcomes[mutant.name]
    assert outcome.killed, f"{mutant.name} ({mutant.file}) survived: {outcome.why}\n{outcome.output[-3000:]}"
