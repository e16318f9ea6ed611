"""The values the training path passes between its steps: small frozen records, each holding its
own version and its lineage back to the raw batch ids.

A record never holds a DataFrame: it names the version-addressed Parquet file the frame lives in
(written once, never overwritten), so a downstream step reads exactly the data its upstream made,
whatever another run did since. No Dagster imports: the Dagster layer stores these as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pandas as pd

from mlops_assets.core import storage

R = TypeVar("R", bound="Record")
SPLIT_COLUMN = "split"  # the split file's one column, row-aligned with the feature file


def content_hash(*parts: object) -> str:
    """A short, stable hash of JSON-serializable parts (versions of derived records)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Record:
    """Common behaviour: plain-dict round trip (unknown keys ignored, so old stored values load)."""

    kind: ClassVar[str] = "record"

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], values: Mapping[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {k: v for k, v in values.items() if k in names}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in kwargs and isinstance(kwargs[f.name], list) and "tuple" in str(f.type):
                kwargs[f.name] = tuple(kwargs[f.name])
        return cls(**kwargs)


@dataclass(frozen=True)
class RawDataset(Record):
    """The union of the accepted batches (version = hash of their ids). Not copied: the frame is
    read from the batch store's write-once per-batch Parquet files, by these ids."""

    kind: ClassVar[str] = "raw_dataset"
    version: str
    batch_ids: tuple[str, ...]
    rows: int
    batches_url: str


@dataclass(frozen=True)
class FeatureSet(Record):
    """Cleaned features with the target; version = hash of the content and the transformation."""

    kind: ClassVar[str] = "feature_set"
    version: str
    data_version: str
    batch_ids: tuple[str, ...]
    path: str
    rows: int
    transformation_version: str
    missing_feature_policy: str
    batches_url: str = ""


@dataclass(frozen=True)
class Split(Record):
    """Train/test assignment of a feature set's rows; the feature file is stored once, the split
    file holds only the assignment column."""

    kind: ClassVar[str] = "train_test_split"
    version: str
    feature_version: str
    data_version: str
    batch_ids: tuple[str, ...]
    feature_path: str
    path: str
    seed: int
    test_fraction: float
    train_rows: int
    test_rows: int
    batches_url: str = ""

    def frame(self) -> pd.DataFrame:
        """The feature set with its `split` column ("train" / "test")."""
        features = read_frame(self.feature_path)
        return features.assign(**{SPLIT_COLUMN: read_frame(self.path)[SPLIT_COLUMN].to_numpy()})


@dataclass(frozen=True)
class TrainedModel(Record):
    """A model logged in MLflow, with the data it learnt from. `fingerprint` names what it was
    trained from (data, features, split, code, parameters): a second request with the same
    fingerprint reuses this model (`reused`)."""

    kind: ClassVar[str] = "trained_model"
    run_id: str
    experiment_id: str
    model_uri: str
    model_id: str
    model_sha256: str
    trained_at: str
    git_sha: str
    dagster_run_id: str
    fingerprint: str
    feature_names: tuple[str, ...]
    positive_class: int | str
    decision_threshold: float
    params: dict[str, Any]
    best_iteration: int
    validation_metrics: dict[str, float]
    data_version: str
    raw_dataset_version: str
    feature_version: str
    feature_path: str
    split_version: str
    batch_ids: tuple[str, ...]
    batches_url: str = ""
    input_example: list[dict[str, Any]] = field(default_factory=list)
    input_example_proba: list[float] = field(default_factory=list)
    metadata_uri: str = ""
    reused: bool = False


@dataclass(frozen=True)
class Evaluation(Record):
    """Hold-out metrics of one trained model, the champion's on the same rows, and the gate."""

    kind: ClassVar[str] = "model_evaluation"
    run_id: str
    model_uri: str
    fingerprint: str
    n_test: int
    test_positive_share: float
    metrics: dict[str, float | None]
    confusion: dict[str, Any]
    champion: dict[str, Any] | None
    champion_note: str
    gate: dict[str, Any]
    criteria: dict[str, Any]
    importance: list[Any]
    reused: bool = False


@dataclass(frozen=True)
class Registration(Record):
    """The model's registry version and the aliases after registration."""

    kind: ClassVar[str] = "registered_model"
    model_name: str
    version: str
    run_id: str = ""
    champion_version: str | None = None
    newly_registered: bool = False
    promoted: bool = False
    replaced_champion: str | None = None
    previous_champion_version: str | None = None
    aliases: tuple[str, ...] = ()
    gate_passed: bool = True
    gate_failures: tuple[str, ...] = ()
    gate_compared_to: str | None = None
    model_sha256: str | None = None
    data_version: str | None = None
    feature_version: str | None = None
    fingerprint: str = ""
    reused: bool = False


@dataclass(frozen=True)
class Deployment(Record):
    """What serves after model_deployment."""

    kind: ClassVar[str] = "model_deployment"
    model_name: str
    live_version: str
    replaced_version: str | None
    endpoint: str
    app_name: str
    skipped: bool = False


RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls for cls in (RawDataset, FeatureSet, Split, TrainedModel, Evaluation, Registration, Deployment)
}


# --- version-addressed files ------------------------------------------------------------------


def write_atomic(url: str, data: bytes) -> bool:
    """Write `data` to `url` whole (a temporary name and a rename, or one object-store put); False if
    it already exists (addresses are versions, so an existing file holds the same bytes)."""
    return storage.write_once(url, data)


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def write_frame(url: str, frame: pd.DataFrame) -> bool:
    return write_atomic(url, parquet_bytes(frame))


def read_frame(url: str) -> pd.DataFrame:
    with storage.open_url(url, "rb") as handle:
        return pd.read_parquet(handle)
