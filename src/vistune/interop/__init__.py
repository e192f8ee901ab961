"""vistune.interop."""
