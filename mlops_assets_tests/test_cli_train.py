"""`mlops-assets train` answers a bad selection or run config with exit 2 and a line naming the
argument, before it looks at the instance or launches anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlops_assets.tools import cli


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").touch()
    return tmp_path


@pytest.mark.parametrize(("argv", "said"), [
    (["--select", "raw_dataset,no_such_asset"], "--select names no asset: no_such_asset"),
    (["--select", "raw_batches,raw_dataset"], "outside the ingestion_onward job (raw_dataset and what follows it"),
    (["--select", "raw_dataset", "--config-json", "{not json"], "--config-json is not JSON"),
    (["--select", "raw_dataset", "--config-json", "[1, 2]"], "--config-json must be a JSON object, got list"),
    (["--select", "raw_dataset", "-c", "missing.yaml"], "-c/--config:"),
    (["--select", "raw_dataset", "-c", "a.yaml", "--config-json", "{}"], "give -c/--config or --config-json, not both"),
    (["--select", "raw_dataset", "--config-json", '{"ops": {"trained_model": {"config": {"bogus": 1}}}}'],
     'unexpected config entry "bogus" at path root:ops:trained_model:config'),
])
def test_a_bad_argument_is_named_and_nothing_runs(home: Path, argv: list[str], said: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", *argv]) == 2
    assert said in capsys.readouterr().err
    assert not (home / "storage").exists()  # no run was launched on the instance


def test_train_without_dagster_home_says_where_to_point_it(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert cli.main(["train", "--select", "raw_dataset"]) == 2
    assert "DAGSTER_HOME is not set" in capsys.readouterr().err
