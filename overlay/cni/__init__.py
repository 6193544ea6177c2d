"""The `overlay` CNI plugin, the agent's side (the executable is native/overlay-cni.c;
`wire` is the format both speak)."""
