"""The tools over the library: the CLI and its evaluate, bench, demo and check commands."""
