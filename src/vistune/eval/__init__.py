"""vistune.eval."""
