import pytest

from lotflow.cli import build_parser, main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("kafka", "topics", "db", "worker", "sink", "simulate", "demo"):
        assert command in out


def test_simulate_options_parse() -> None:
    args = build_parser().parse_args(["simulate", "--seed", "3", "--count", "10", "--rate", "5", "--faults", "none"])
    assert (args.seed, args.count, args.rate, args.faults) == (3, 10, 5.0, "none")


def test_a_bad_fault_spec_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--faults", "nonsense=0.1"]) == 2
    assert "nonsense" in capsys.readouterr().err
