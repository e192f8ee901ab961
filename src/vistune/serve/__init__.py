"""vistune.serve."""
