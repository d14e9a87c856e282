"""Faults a run survives or stops on cleanly: signals (pre-emption), non-finite steps, a second writer."""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp

from solarjax import ckpt
from solarjax.model import Params
from solarjax.train.setup import maybe_initialize_distributed


class Preempted(SystemExit):
    """The run stopped on SIGTERM/SIGINT after checkpointing the step it was in.

    A ``SystemExit`` whose code is the shell's convention for the signal (143 for SIGTERM, 130 for
    SIGINT), so the process ends even when a caller catches ``Exception``, and a relaunch loop can
    tell a preemption from a failure. Running the same command again resumes.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(128 + signum)
        self.message, self.signum, self.exit_code = message, signum, 128 + signum

    def __str__(self) -> str:
        return self.message


class TrainingDiverged(ValueError):
    """Too many consecutive steps had a non-finite loss or gradient norm (``train.max_nonfinite_skips``)."""


class StopSignals:
    """SIGTERM / SIGINT ask the loop to stop after the step in progress (it then checkpoints).

    One process: Python handlers set a flag. Several processes: a host may be signalled alone, and
    every host must save the same step, so the decision is JAX's preemption sync point
    (``multihost_utils.reached_preemption_sync_point``, through Orbax's wrapper), whose notifier owns
    SIGTERM; a SIGINT is forwarded to it as a SIGTERM. A second SIGINT interrupts at once.
    """

    def __enter__(self) -> "StopSignals":
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.multi = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if not (self.multi and sig == signal.SIGTERM):
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])
        if self.multi:
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        """Called by every process after every step; True at the step to checkpoint and stop at."""
        if not self.multi:
            return self.signum is not None
        from orbax.checkpoint import utils as ocp_utils

        if ocp_utils.reached_preemption(step):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps, reading each step's flag one step late so the
    host never waits for the step it has just dispatched."""

    def __init__(self, budget: int):
        self.budget, self.streak, self.total = int(budget), 0, 0
        self.pending: tuple[int, dict[str, jax.Array]] | None = None

    def observe(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Take this step's metrics; check the previous step's (raises ``TrainingDiverged``)."""
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._check(*previous)

    def settle(self) -> None:
        """Check the latest step too (before a save, at a stop, at the end)."""
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._check(*previous)

    def _check(self, step: int, metrics: dict[str, jax.Array]) -> None:
        flags = jax.device_get({k: metrics[k] for k in ("nonfinite", "loss", "grad_norm")})
        if not int(flags["nonfinite"]):
            self.streak = 0
            return
        self.streak += 1
        self.total += 1
        if self.streak > self.budget:
            cause = " and ".join(f"{name} {float(flags[key])}" for key, name in
                                 (("loss", "loss"), ("grad_norm", "gradient norm")) if not math.isfinite(flags[key]))
            raise TrainingDiverged(
                f"training stopped at step {step}: {cause}, {self.streak} non-finite steps in a row "
                f"(train.max_nonfinite_skips={self.budget}); skipped steps did not change the weights, "
                "and no checkpoint holds a non-finite state. Lower optim.lr or check the data, then resume")


@jax.jit
def _all_finite(params: Params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _params_finite(params: Params) -> bool:
    return bool(_all_finite(params))


# ----------------------------------------------------------------------------- the loop



def one_writer(fn):
    """``fn(config, ...)`` holding the run directory's lock (``train.out_dir``, process 0), released
    however it ends (:func:`solarjax.run_record.hold`)."""
    @functools.wraps(fn)
    def run(config, *args, **kwargs):
        from solarjax import run_record

        maybe_initialize_distributed(config)  # process_index is known only after it
        out_dir = config.train.out_dir if jax.process_index() == 0 else None
        with run_record.hold(ckpt.as_path(out_dir) if out_dir else None):
            return fn(config, *args, **kwargs)

    return run
