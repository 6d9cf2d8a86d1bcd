"""The `gemma4` command line."""
