"""How the command line talks to its user: a progress bar on a terminal, library errors in its words."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from iris_core.errors import IrisError

log = logging.getLogger("iris_core")


class TerminalProgress:
    """A tqdm bar per stage on a terminal; quiet in a pipe (stage changes go to the log)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            if self.enabled:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=stage, unit="step", leave=False, file=sys.stderr)
            else:
                log.info("%s", stage)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


#: the library's input names (IrisError.inputs) as this command line spells them
CLI_INPUTS = {"references": "--reference IMAGE LABELS", "library": "--library FILE", "structures": "--structures",
              "hermes_modality": "--hermes-modality", "classes": "--classes", "model": "--model FILE",
              "target": "--target", "output": "--output"}


def in_cli_words(exc: IrisError) -> str:
    """A library error as this command line's user reads it: the options it concerns named after it."""
    flags = [CLI_INPUTS[i] for i in exc.inputs if i in CLI_INPUTS]
    return f"{exc} ({' or '.join(flags)})" if flags else str(exc)


def preview_title(target: str, sidecar: dict, model: str | None = None) -> str:
    """A preview's title: the target, the strategy the run used as its sidecar records it ('library' for a
    task library, 'hermes' for named structures: not the --strategy asked for), the model."""
    return f"{Path(target).name}: {sidecar.get('strategy', '?')}" + (f", {model}" if model else "")
