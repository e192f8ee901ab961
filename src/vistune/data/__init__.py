"""vistune.data."""
