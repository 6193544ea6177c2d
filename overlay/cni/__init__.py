"""The `overlay` CNI plugin. `client` and `wire` must stay stdlib-only: they run per pod start."""
