"""The trained model, tracked in MLflow."""
