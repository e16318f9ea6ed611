"""Features: the documented cleaning policy, versioned Parquet, and the leakage-free split."""

import json
from typing import Literal

import dagster as dg

from mlops_assets import constants as c
from mlops_assets.core import records, storage
from mlops_assets.core.records import FeatureSet, RawDataset, Split, content_hash
from mlops_assets.defs.ingestion.assets import load_raw_frame
from mlops_assets.defs.metadata import redact_uri
from mlops_assets.defs.resources import PlatformResource
from mlops_assets.features import cleaning as feat
from mlops_assets.settings import join_url
from mlops_assets.training.tracking import source_digest

SPLIT_CODE_VERSION = "2"  # bump when the split is drawn differently
CLEANING_SOURCES = ("mlops_assets.features.cleaning",)  # a change to the cleaning code is new features
MEMO_DIR = "by-input"  # feature sets by what they were computed from, so unchanged inputs are not recomputed


def _memo(url: str) -> dict | None:
    """A result stored for these very inputs (record, metadata, check figures), if there is one."""
    return storage.read_json(url) if storage.exists(url) else None


class FeatureConfig(dg.Config):
    """How missing feature values are handled (see features/cleaning.py for the whole policy)."""

    missing_feature_policy: Literal["drop_row", "keep_nan"] = c.MISSING_FEATURE_POLICY  # type: ignore[assignment]


@dg.asset(group_name=c.GROUP_FEATURES, owners=c.ASSET_OWNERS, kinds={"pandas", "parquet"}, deps=["validation_report"],
          code_version=c.TRANSFORMATION_VERSION)
def feature_set(context: dg.AssetExecutionContext, config: FeatureConfig, platform: PlatformResource,
                raw_dataset: RawDataset) -> dg.Output[FeatureSet]:
    """Cleaned, deduplicated features with the target, as Parquet addressed by the feature version."""
    settings = platform
    spec = platform.spec()
    # The same raw data, cleaning policy, spec and cleaning code give the same features: computed once.
    inputs = content_hash(raw_dataset.version, c.TRANSFORMATION_VERSION, config.missing_feature_policy, repr(spec),
                          source_digest(CLEANING_SOURCES))
    memo_url = join_url(settings.features_url, MEMO_DIR, f"{inputs}.json")
    stored = _memo(memo_url)
    if stored is not None:
        record = FeatureSet.from_dict(stored["record"])
        if storage.exists(record.path):
            context.log.info(f"raw data {raw_dataset.version} was cleaned before: feature set {record.version} reused")
            return dg.Output(record, data_version=dg.DataVersion(record.version),
                             metadata={**stored["metadata"], "reused": True})
    features, stats = feat.clean_features(load_raw_frame(raw_dataset, spec), spec, config.missing_feature_policy)
    version = feat.feature_version(features, f"{c.TRANSFORMATION_VERSION}:{config.missing_feature_policy}")
    path = join_url(settings.features_url, version, "features.parquet")
    records.write_frame(path, features)  # versions are immutable: same content, same file, written once
    record = FeatureSet(version=version, data_version=raw_dataset.version, batch_ids=raw_dataset.batch_ids,
                        path=path, rows=len(features), transformation_version=c.TRANSFORMATION_VERSION,
                        missing_feature_policy=config.missing_feature_policy, batches_url=raw_dataset.batches_url)
    metadata: dict[str, dg.RawMetadataValue] = {
        "feature_version": version,
        "data_version": raw_dataset.version,
        "transformation_version": c.TRANSFORMATION_VERSION,
        "missing_feature_policy": config.missing_feature_policy,
        "feature_path": redact_uri(path),
        "positive_rate": round(float(features[feat.TARGET].mean()), 4) if len(features) else 0.0,
        **{k: v for k, v in stats.__dict__.items()},
        "dagster/row_count": len(features),
    }
    records.write_atomic(memo_url, json.dumps({"record": record.as_dict(), "metadata": metadata}, default=str).encode())
    return dg.Output(record, data_version=dg.DataVersion(version), metadata={**metadata, "reused": False})


class SplitConfig(dg.Config):
    test_fraction: float = c.TEST_FRACTION
    seed: int = c.SPLIT_SEED


@dg.asset(group_name=c.GROUP_FEATURES, owners=c.ASSET_OWNERS, kinds={"pandas"}, code_version=SPLIT_CODE_VERSION,
          check_specs=[dg.AssetCheckSpec("no_shared_feature_vectors", asset="train_test_split", blocking=True,
                                         description="No feature vector is on both sides of the split.")])
def train_test_split(context: dg.AssetExecutionContext, config: SplitConfig, platform: PlatformResource,
                     feature_set: FeatureSet):
    """A stratified, seeded train/test split with no feature vector on both sides."""
    spec = platform.spec()
    version = content_hash(feature_set.version, SPLIT_CODE_VERSION, config.seed, config.test_fraction)
    # Only the assignment column is stored: the features stay in the one feature file.
    path = join_url(platform.features_url, feature_set.version, f"split-{version}.parquet")
    memo_url = join_url(platform.features_url, feature_set.version, f"split-{version}.json")
    stored = _memo(memo_url)
    if stored is not None and storage.exists(path):  # drawn before from the same features, seed and code
        context.log.info(f"split {version} of feature set {feature_set.version} was drawn before: reused")
        yield dg.Output(Split.from_dict(stored["record"]), data_version=dg.DataVersion(version),
                        metadata={**stored["metadata"], "reused": True})
        yield dg.AssetCheckResult(check_name="no_shared_feature_vectors", passed=stored["shared"] == 0,
                                  metadata={"shared_feature_vectors": stored["shared"]})
        return
    features = records.read_frame(feature_set.path)
    split = feat.split_train_test(features, spec.feature_names, config.test_fraction, config.seed)
    shared = feat.shared_vectors(split, spec.feature_names)
    counts = split.groupby(feat.SPLIT)[feat.TARGET].agg(["size", "mean"])
    records.write_frame(path, split[[feat.SPLIT]])
    rows = {side: int(counts.loc[side, "size"]) if side in counts.index else 0 for side in ("train", "test")}
    record = Split(version=version, feature_version=feature_set.version, data_version=feature_set.data_version,
                   batch_ids=feature_set.batch_ids, feature_path=feature_set.path, path=path, seed=config.seed,
                   test_fraction=config.test_fraction, train_rows=rows["train"], test_rows=rows["test"],
                   batches_url=feature_set.batches_url)
    metadata: dict[str, dg.RawMetadataValue] = {
        "feature_version": feature_set.version,
        "data_version": feature_set.data_version,
        "feature_path": redact_uri(feature_set.path),
        "raw_dataset_version": feature_set.data_version,
        "split_version": version,
        "split_path": redact_uri(path),
        "split_seed": config.seed,
        "test_fraction": config.test_fraction,
        "train_rows": rows["train"],
        "test_rows": rows["test"],
        "train_positive_rate": round(float(counts.loc["train", "mean"]), 4) if "train" in counts.index else 0.0,
        "test_positive_rate": round(float(counts.loc["test", "mean"]), 4) if "test" in counts.index else 0.0,
    }
    records.write_atomic(memo_url, json.dumps({"record": record.as_dict(), "metadata": metadata,
                                               "shared": int(shared)}, default=str).encode())
    yield dg.Output(record, data_version=dg.DataVersion(version), metadata={**metadata, "reused": False})
    yield dg.AssetCheckResult(
        check_name="no_shared_feature_vectors", passed=shared == 0,
        metadata={"shared_feature_vectors": shared},
    )


defs = dg.Definitions(assets=[feature_set, train_test_split])
