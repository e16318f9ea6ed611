"""The Ray Serve deployment, its health check and the rollback job."""
