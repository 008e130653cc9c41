"""Steering a running generation from outside (a server's interrupt, skip and progress): flags and step counts."""

from __future__ import annotations

from typing import Callable


class StopSampling(Exception):
    """Raised from a step callback to end sampling early; the pipeline keeps the latest prediction."""


class RunControl:
    """Shared between a running `pipeline.run` and whoever watches it (another thread).

    `interrupt()` ends the job at the next step and keeps what was made so far, as A1111's Interrupt does;
    `skip()` does that for the current batch only and goes on with the next. `step`/`total`/`label` follow
    the sampler; `preview()` gives the latest clean-latent prediction (None before the first step)."""

    def __init__(self) -> None:
        self.interrupted = False
        self.skipped = False
        self.label, self.step, self.total = "", 0, 0
        self.batch, self.batches = 0, 0
        self._preview: Callable[[], object] | None = None

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    def preview(self):
        return None if self._preview is None else self._preview()

    def watch(self, label: str, denoiser, inner: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        """The step callback for one sampling pass: records progress, then stops if asked to."""
        self.label, self.step, self.total = label, 0, 0
        self._preview = denoiser.last_denoised

        def callback(i: int, total: int) -> None:
            self.step, self.total = i + 1, total
            if inner is not None:
                inner(i, total)
            if self.interrupted or self.skipped:
                raise StopSampling()

        return callback
