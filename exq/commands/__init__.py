"""One module per `exq` subcommand group; each imports its stage only when run, so `exq --help` is instant."""
