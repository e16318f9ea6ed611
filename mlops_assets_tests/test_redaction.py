"""redact_uri / redact_text: credentials go, everything else stays byte for byte."""

from __future__ import annotations

import pytest

from mlops_assets.core.redaction import (
    has_credentials,
    is_secret_name,
    redact_text,
    redact_uri,
    redact_values,
)


@pytest.mark.parametrize(("uri", "expected"), [
    ("postgresql+psycopg2://u:p@h/db", "postgresql+psycopg2://u:***@h/db"),
    ("postgresql+psycopg2://mlops:pw@127.0.0.1:5432/mlflow", "postgresql+psycopg2://mlops:***@127.0.0.1:5432/mlflow"),
    ("http://u:p@h", "http://u:***@h"),
    ("https://u:p@h:8443/api?x=1", "https://u:***@h:8443/api?x=1"),
    # A lone user info may itself be a token (https://<token>@host): hidden too.
    ("https://ghp_abc@github.com/o/r.git", "https://***@github.com/o/r.git"),
    # Unencoded '@', '/' or '#' inside the password.
    ("postgresql://u:p@ss@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:p/ss@h/db", "postgresql://u:***@h/db"),
    ("http://u:p#x@h/", "http://u:***@h/"),
    ("http://h/db?password=p&sslmode=require", "http://h/db?password=***&sslmode=require"),
    ("postgresql://h/db?user=u&password=p", "postgresql://h/db?user=u&password=***"),
    ("http://h/x?api_key=k&Token=t&client-secret=s&page=2", "http://h/x?api_key=***&Token=***&client-secret=***&page=2"),
    ("http://h/cb#access_token=t&state=1", "http://h/cb#access_token=***&state=1"),
    # S3 presigned: credential, signature and session token go; algorithm, date, expiry stay.
    ("https://b.s3.amazonaws.com/k.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=ab12"
     "&X-Amz-Security-Token=tok",
     "https://b.s3.amazonaws.com/k.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=***"
     "&X-Amz-Security-Token=***"),
    ("https://acct.blob.core.windows.net/c/b?sv=2022&sig=abc%3D&se=2030", "https://acct.blob.core.windows.net/c/b?sv=2022&sig=***&se=2030"),
])
def test_credentials_in_a_uri_are_replaced_by_stars(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected
    assert has_credentials(uri)
    assert redact_uri(expected) == expected  # idempotent


@pytest.mark.parametrize("uri", [
    "sqlite:////tmp/data/mlflow/mlflow.db", "sqlite:///data/mlflow.db", "file:///tmp/a%40b/x",
    "http://127.0.0.1:5000", "http://h:8080/x?e=a@b", "http://h:8080?email=a@b.c",
    "s3://bucket/raw/batch.csv", "mlflow-artifacts:/", "models:/m/3", "runs:/abc/model_card/version-1.md",
    "/tmp/data/landing", "http://h/x?page=2&sort=asc&monkey=no", "http://[::1:5000/", "",
])
def test_uris_without_credentials_come_back_unchanged(uri: str) -> None:
    assert redact_uri(uri) == uri
    assert not has_credentials(uri)


def test_every_uri_in_a_message_is_redacted_and_the_rest_of_the_message_kept() -> None:
    message = ("(psycopg2.OperationalError) could not connect to postgresql+psycopg2://mlops:s3cret@127.0.0.1:5/db; "
               "retried http://a:b2@mlflow:5000/api, then s3://bucket/k?X-Amz-Signature=sig9.")
    out = redact_text(message)
    assert out == ("(psycopg2.OperationalError) could not connect to postgresql+psycopg2://mlops:***@127.0.0.1:5/db; "
                   "retried http://a:***@mlflow:5000/api, then s3://bucket/k?X-Amz-Signature=***")
    assert redact_text("no uri here, port 5432") == "no uri here, port 5432"


def test_password_pairs_outside_a_uri_are_redacted_as_in_a_libpq_dsn() -> None:
    assert (redact_text("dsn host=h port=5 user=u password=pw1 dbname=d")
            == "dsn host=h port=5 user=u password=*** dbname=d")
    assert redact_text("MLOPS_API_TOKEN='tok en' set") == "MLOPS_API_TOKEN=*** set"
    assert redact_text("password authentication failed for user \"u\"") == "password authentication failed for user \"u\""


def test_nested_values_are_redacted_wherever_a_string_sits() -> None:
    report = {"tracking_uri": "http://u:p@h", "runs": [{"source": "postgresql://u:p@h/db"}], "n": 3,
              "pair": ("x", "http://h/?token=t")}
    assert redact_values(report) == {"tracking_uri": "http://u:***@h", "runs": [{"source": "postgresql://u:***@h/db"}],
                                     "n": 3, "pair": ("x", "http://h/?token=***")}


@pytest.mark.parametrize(("name", "secret"), [
    ("password", True), ("PGPASSWORD", True), ("X-Amz-Signature", True), ("sig", True), ("key", True),
    ("access_key", True), ("client_secret", True), ("user", False), ("sslmode", False), ("X-Amz-SignedHeaders", False),
    ("X-Amz-Date", False), ("page", False),
])
def test_secret_parameter_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret
