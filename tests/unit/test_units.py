import pytest

from lotflow.verification.units import IncompatibleUnits, conversion_factor, convert


def test_pound_to_kilogram() -> None:
    assert conversion_factor("LB", "KG") == pytest.approx(0.45359237)
    assert convert(1000, "KG", "LB") == pytest.approx(2204.62262, rel=1e-6)


def test_gallon_to_liter_and_identity() -> None:
    assert convert(1, "GAL", "L") == pytest.approx(3.785411784)
    assert conversion_factor("EA", "EA") == 1.0


@pytest.mark.parametrize(("a", "b"), [("KG", "L"), ("EA", "KG"), ("M", "LB")])
def test_incompatible_dimensions_raise(a: str, b: str) -> None:
    with pytest.raises(IncompatibleUnits):
        conversion_factor(a, b)
