"""Registration, aliases and the instance lookups that `trace` uses."""
