"""Hold-out evaluation against the champion and the promotion gate."""
