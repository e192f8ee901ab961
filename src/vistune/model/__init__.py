"""vistune.model."""
