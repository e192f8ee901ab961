"""One module per `vistune` subcommand: argument parsing and printing only."""
