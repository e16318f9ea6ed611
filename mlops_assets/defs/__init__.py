"""The thin Dagster layer, one folder per lifecycle stage (assets.py, and sensors.py where they
belong); `resources.py` builds every resource once. `mlops_assets.definitions` loads this folder."""
