"""The serving token comes from MLOPS_API_TOKEN or a mounted file, never from a config."""

from pathlib import Path

import pytest

from mlops_assets.serving.config import api_token


def test_variable_wins_over_file(tmp_path: Path):
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert api_token({"MLOPS_API_TOKEN_FILE": str(secret)}) == "from-file"
    assert api_token({"MLOPS_API_TOKEN": "from-env", "MLOPS_API_TOKEN_FILE": str(secret)}) == "from-env"
    assert api_token({}) == ""


def test_unreadable_token_file_names_the_variable_and_path(tmp_path: Path):
    missing = tmp_path / "absent"
    with pytest.raises(ValueError, match=f"MLOPS_API_TOKEN_FILE={missing}: cannot read"):
        api_token({"MLOPS_API_TOKEN_FILE": str(missing)})
