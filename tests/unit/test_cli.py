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


def test_settings_survive_the_trip_through_a_child_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    from lotflow.settings import Settings

    original = Settings(topic_prefix="t1.", document_wait_s=3.5, clickhouse_dsn=SecretStr("https://u:p@h:8443"))
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == original.model_copy(update={"var_dir": original.var_dir.resolve()})
