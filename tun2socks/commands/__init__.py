"""The CLI subcommands other than run: check, down, status."""
