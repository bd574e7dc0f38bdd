"""Model files and what travels with them: checkpoints, downloads, task libraries, Hermes vocabularies."""
