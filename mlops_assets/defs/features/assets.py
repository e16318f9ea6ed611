"""Features: the documented cleaning policy, versioned Parquet, and the leakage-free split."""

from typing import Literal

import dagster as dg
import fsspec
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.defs.metadata import redact_uri, required_text
from mlops_assets.defs.resources import PlatformResource
from mlops_assets.features import cleaning as feat
from mlops_assets.settings import join_url


class FeatureConfig(dg.Config):
    """How missing feature values are handled (see features/cleaning.py for the whole policy)."""

    missing_feature_policy: Literal["drop_row", "keep_nan"] = c.MISSING_FEATURE_POLICY  # type: ignore[assignment]


@dg.asset(group_name=c.GROUP_FEATURES, kinds={"pandas", "parquet"}, deps=["validation_report"])
def feature_set(context: dg.AssetExecutionContext, config: FeatureConfig, platform: PlatformResource,
                raw_dataset: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Cleaned, deduplicated features with the target, as versioned Parquet."""
    settings = platform.settings()
    data_version = required_text(context.instance, "raw_dataset", "data_version")
    features, stats = feat.clean_features(raw_dataset, platform.spec(), config.missing_feature_policy)
    version = feat.feature_version(features, f"{c.TRANSFORMATION_VERSION}:{config.missing_feature_policy}")
    path = join_url(settings.features_url, version, "features.parquet")
    fs, stripped = fsspec.core.url_to_fs(path)
    if not fs.exists(stripped):  # versions are immutable: same content, same file
        fs.makedirs(stripped.rsplit("/", 1)[0], exist_ok=True)
        with fsspec.open(path, "wb") as handle:
            features.to_parquet(handle, index=False)
    return dg.Output(
        features,
        data_version=dg.DataVersion(version),
        metadata={
            "feature_version": version,
            "data_version": data_version,
            "transformation_version": c.TRANSFORMATION_VERSION,
            "missing_feature_policy": config.missing_feature_policy,
            "feature_path": redact_uri(path),
            "positive_rate": round(float(features[feat.TARGET].mean()), 4) if len(features) else 0.0,
            **{k: v for k, v in stats.__dict__.items()},
            "dagster/row_count": len(features),
        },
    )


class SplitConfig(dg.Config):
    test_fraction: float = c.TEST_FRACTION
    seed: int = c.SPLIT_SEED


@dg.asset(group_name=c.GROUP_FEATURES, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("no_shared_feature_vectors", asset="train_test_split", blocking=True,
                                         description="No feature vector is on both sides of the split.")])
def train_test_split(context: dg.AssetExecutionContext, config: SplitConfig, platform: PlatformResource,
                     feature_set: pd.DataFrame):
    """A stratified, seeded train/test split with no feature vector on both sides."""
    spec = platform.spec()
    upstream = {key: required_text(context.instance, "feature_set", key)
                for key in ("feature_version", "data_version", "feature_path")}
    split = feat.split_train_test(feature_set, spec.feature_names, config.test_fraction, config.seed)
    shared = feat.shared_vectors(split, spec.feature_names)
    counts = split.groupby(feat.SPLIT)[feat.TARGET].agg(["size", "mean"])
    yield dg.Output(
        split,
        metadata={
            **upstream,
            "raw_dataset_version": upstream["data_version"],
            "split_seed": config.seed,
            "test_fraction": config.test_fraction,
            "train_rows": int(counts.loc["train", "size"]) if "train" in counts.index else 0,
            "test_rows": int(counts.loc["test", "size"]) if "test" in counts.index else 0,
            "train_positive_rate": round(float(counts.loc["train", "mean"]), 4) if "train" in counts.index else 0.0,
            "test_positive_rate": round(float(counts.loc["test", "mean"]), 4) if "test" in counts.index else 0.0,
        },
    )
    yield dg.AssetCheckResult(
        check_name="no_shared_feature_vectors", passed=shared == 0,
        metadata={"shared_feature_vectors": shared},
    )


defs = dg.Definitions(assets=[feature_set, train_test_split])
