"""Ingestion of landed files: each kind of bad file is quarantined with a reason, good batches stay."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from mlops_assets.ingestion.batches import (
    LandedFileNotFoundError,
    accepted_batches,
    dataset_version,
    hash_landed_files,
    ingest_batch,
    ingest_landed_files,
    list_landed_files,
    load_raw_dataset,
)
from mlops_assets.tools.simulator import write_batch


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def store(tmp_path: Path) -> dict[str, str]:
    return {"landing": str(tmp_path / "raw"), "batches": str(tmp_path / "batches"),
            "quarantine": str(tmp_path / "quarantine")}


def _ingest(store, spec):
    return ingest_landed_files(store["landing"], store["batches"], store["quarantine"], spec)


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


def _bad_files(spec, simulated: pd.DataFrame) -> dict[str, tuple[str | bytes, str, str | None, str | None]]:
    """name -> (content, expected kind, expected column, expected example)."""
    small = simulated.head(20)
    wrong_type = small.astype(object)
    wrong_type.loc[4, "URL_Length"] = "long"
    out_of_domain = small.copy()
    out_of_domain.loc[2, "port"] = 0  # port takes only -1 and 1
    bad_label = small.copy()
    bad_label.loc[1, spec.label] = 2
    return {
        "missing_column.csv": (_csv(small.drop(columns=["Favicon"])), "missing_column", "Favicon", None),
        "extra_column.csv": (_csv(small.assign(user_agent=1)), "unexpected_column", "user_agent", None),
        "wrong_type.csv": (_csv(wrong_type), "wrong_type", "URL_Length", "'long'"),
        "out_of_domain.csv": (_csv(out_of_domain), "out_of_domain", "port", "0"),
        "bad_label.csv": (_csv(bad_label), "out_of_domain", spec.label, "2"),
        "empty.csv": ("", "unreadable", None, None),
        "header_only.csv": (",".join(spec.columns) + "\n", "empty", None, None),
        "not_a_table.parquet": (b"PAR1 this is not parquet", "unreadable", None, None),
        "notes.txt": ("hello", "unreadable", None, None),
    }


def test_good_files_are_accepted_once_and_stored_by_content_hash(store, spec, simulated):
    write_batch(simulated.head(100), store["landing"], name="a.csv")
    write_batch(simulated.iloc[100:200], store["landing"], fmt="parquet", name="b.parquet")
    first = _ingest(store, spec)
    assert sorted(b.file_name for b in first.accepted) == ["a.csv", "b.parquet"]
    assert not first.quarantined
    for batch in first.accepted:
        source = Path(store["landing"]) / batch.file_name
        assert batch.batch_id == hashlib.sha256(source.read_bytes()).hexdigest()
        assert (Path(batch.stored_at) / f"source.{batch.file_format}").read_bytes() == source.read_bytes()
        assert batch.rows == 100 and batch.columns == spec.columns
    again = _ingest(store, spec)
    assert not again.accepted and sorted(again.already_accepted) == ["a.csv", "b.parquet"]
    assert len(accepted_batches(store["batches"])) == 2


def test_each_kind_of_bad_file_is_quarantined_with_a_reason_and_good_batches_stay(store, spec, simulated):
    write_batch(simulated.head(100), store["landing"], name="good.csv")
    _ingest(store, spec)
    before = _tree_digest(Path(store["batches"]))

    bad = _bad_files(spec, simulated)
    for name, (content, *_rest) in bad.items():
        path = Path(store["landing"]) / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = _ingest(store, spec)

    assert not result.accepted
    assert sorted(q.file_name for q in result.quarantined) == sorted(bad)
    for record in result.quarantined:
        _content, kind, column, example = bad[record.file_name]
        first = record.violations[0]
        assert first["kind"] == kind, record.reason
        assert record.file_name in record.moved_to
        if column:
            assert first["column"] == column and column in record.reason
        if example:
            assert first["example"] == example and example in record.reason
        reason_file = Path(f"{record.moved_to}.reason.json")
        saved = json.loads(reason_file.read_text())
        assert saved["reason"] == record.reason and saved["file_name"] == record.file_name
        assert Path(record.moved_to).exists()
        assert not (Path(store["landing"]) / record.file_name).exists()  # moved, not copied

    assert _tree_digest(Path(store["batches"])) == before  # accepted batches untouched
    assert [f.name for f in list_landed_files(store["landing"])] == ["good.csv"]


def test_wrong_type_reason_names_file_column_and_example(store, spec, simulated):
    frame = simulated.head(10).astype(object)
    frame.loc[6, "SFH"] = "maybe"
    write_batch(frame, store["landing"], name="typed.csv")
    (record,) = _ingest(store, spec).quarantined
    assert record.reason == "column 'SFH' must hold whole numbers; found 'maybe' at data row 7"


def test_hidden_and_temporary_files_are_not_landed_yet(store, spec, simulated):
    Path(store["landing"]).mkdir(parents=True)
    (Path(store["landing"]) / ".partial.csv.tmp").write_text("half a file")
    (Path(store["landing"]) / ".hidden.csv").write_text("x")
    assert list_landed_files(store["landing"]) == []
    assert _ingest(store, spec).quarantined == []


def test_raw_dataset_is_the_union_with_a_version_from_the_hashes(store, spec, simulated):
    write_batch(simulated.head(100), store["landing"], name="a.csv")
    write_batch(simulated.iloc[100:250], store["landing"], name="b.csv")
    _ingest(store, spec)
    batches = accepted_batches(store["batches"])
    union = load_raw_dataset(batches, spec)
    assert len(union) == 250 and list(union.columns) == spec.columns
    version = dataset_version([b.batch_id for b in batches])
    assert version == dataset_version([b.batch_id for b in reversed(batches)])
    write_batch(simulated.iloc[250:300], store["landing"], name="c.csv")
    _ingest(store, spec)
    assert dataset_version([b.batch_id for b in accepted_batches(store["batches"])]) != version


def test_any_fsspec_url_works(spec, simulated):
    urls = {"landing": "memory://t1/raw", "batches": "memory://t1/batches", "quarantine": "memory://t1/q"}
    write_batch(simulated.head(30), urls["landing"], name="m.csv")
    write_batch(simulated.head(30).drop(columns=["port"]), urls["landing"], name="bad.csv")
    result = _ingest(urls, spec)
    assert [b.file_name for b in result.accepted] == ["m.csv"]
    assert [q.file_name for q in result.quarantined] == ["bad.csv"]
    assert len(load_raw_dataset(accepted_batches(urls["batches"]), spec)) == 30


# One file at a time, by content hash: what each partition of raw_batches does.


def test_a_file_is_ingested_by_its_content_hash_once_and_reported_again_after(store, spec, simulated):
    write_batch(simulated.head(50), store["landing"], name="a.csv")
    write_batch(simulated.iloc[50:80], store["landing"], name="b.csv")
    by_hash = hash_landed_files(store["landing"])
    assert sorted(f.name for f in by_hash.values()) == ["a.csv", "b.csv"]
    sha = next(h for h, f in by_hash.items() if f.name == "b.csv")
    first = ingest_batch(sha, store["landing"], store["batches"], store["quarantine"], spec,
                         hint_url=by_hash[sha].url)
    assert first.status == "accepted" and first.batch is not None and first.batch.rows == 30
    assert [b.batch_id for b in accepted_batches(store["batches"])] == [sha]  # only that file
    again = ingest_batch(sha, store["landing"], store["batches"], store["quarantine"], spec)
    assert again.status == "already_accepted" and again.batch == first.batch


def test_a_bad_file_ingested_by_hash_is_quarantined_and_its_reason_reported_again(store, spec, simulated):
    bad = simulated.head(20).astype(object)
    bad.loc[4, "URL_Length"] = "long"
    write_batch(bad, store["landing"], name="bad.csv")
    [sha] = hash_landed_files(store["landing"])
    first = ingest_batch(sha, store["landing"], store["batches"], store["quarantine"], spec)
    assert first.status == "quarantined" and first.quarantine is not None
    assert first.quarantine.violations[0]["column"] == "URL_Length"
    assert not list(Path(store["landing"]).iterdir())  # moved out of the landing folder
    again = ingest_batch(sha, store["landing"], store["batches"], store["quarantine"], spec)
    assert again.status == "quarantined" and again.quarantine == first.quarantine
    assert accepted_batches(store["batches"]) == []


def test_a_hash_no_file_has_is_an_error_that_names_it(store, spec):
    with pytest.raises(LandedFileNotFoundError, match="0123456789abcdef"):
        ingest_batch("0123456789abcdef" * 4, store["landing"], store["batches"], store["quarantine"], spec)
