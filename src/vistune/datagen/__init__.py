"""vistune.datagen."""
