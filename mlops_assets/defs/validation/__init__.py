"""The validation report and its blocking checks."""
