"""vistune.train."""
