"""Pure, typed ML logic with no Dagster imports: the Dagster layer in `defs/` stays thin."""
