"""One small file per slice; each `get_config()` returns a `core.mesh.SliceConfig`."""
