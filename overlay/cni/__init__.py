"""The `overlay` CNI plugin. `client` must stay stdlib-only: it runs per pod start."""
