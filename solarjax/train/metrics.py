"""What a run reports: the metrics log (JSONL, TensorBoard), MFU and the mean eval loss."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import jax
from etils import epath

from solarjax import ckpt
from solarjax.chips import peak_flops  # the one peak-FLOPs table
from solarjax.config import ConfigError, ModelConfig
from solarjax.model import Params
from solarjax.train.step import global_batch


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, num_devices: int) -> float | None:
    peak = peak_flops()
    return None if peak is None else tokens_per_s * cfg.flops_per_token(seq_len) / (peak * num_devices)


# ----------------------------------------------------------------------------- initialisation


def json_safe(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record that is valid JSON: non-finite floats become null and ``"nonfinite": true`` is added."""
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    if any(isinstance(v, float) and not math.isfinite(v) for v in record.values()):
        out["nonfinite"] = True
    return out


class MetricsLogger:
    """Metrics to stdout (through ``echo``), a JSONL file and optionally TensorBoard; process 0 only."""

    def __init__(self, jsonl: epath.Path | None, tensorboard_dir: epath.Path | None):
        self.file = None
        self.tb = None
        if jax.process_index() != 0:
            return
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            self.file = jsonl.open("a")
        if tensorboard_dir is not None:
            self.tb = tensorboard_writer()(str(tensorboard_dir))

    def log(self, record: dict[str, Any], echo) -> None:
        if jax.process_index() != 0:
            return
        echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.file:
            self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def tensorboard_writer():
    """tensorboardX's ``SummaryWriter``; a missing package is one line saying how to get it (a
    logger that was asked for and is missing stops the run before it starts, not after)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError('logging.tensorboard=True needs tensorboardX, which is not installed: pip install '
                          '"solarjax[tensorboard]" (or set --config.logging.tensorboard=false)') from None
    return SummaryWriter


def check_loggers(config) -> None:
    """Refuse, before any model loads, a configured logger that cannot run."""
    if config.logging.tensorboard:
        tensorboard_writer()


def metrics_logger(config, out_dir: epath.Path | None) -> MetricsLogger:
    """``logging.jsonl`` (default ``<out_dir>/metrics.jsonl``) and TensorBoard under ``out_dir`` if enabled."""
    jsonl = ckpt.as_path(config.logging.jsonl) if config.logging.jsonl else (
        out_dir / "metrics.jsonl" if out_dir else None)
    return MetricsLogger(jsonl, (out_dir / "tensorboard") if (config.logging.tensorboard and out_dir) else None)


def evaluate(eval_step, params: Params, eval_ds, num_batches: int, batch_shardings) -> float | None:
    """Token-weighted mean loss over the first ``num_batches`` of the held-out split."""
    if eval_ds is None:
        return None
    total, tokens = 0.0, 0.0
    iterator = iter(eval_ds)
    for _ in range(num_batches):
        try:
            local = next(iterator)
        except StopIteration:
            break
        m = jax.device_get(eval_step(params, global_batch(local, batch_shardings)))
        total += float(m["loss"]) * float(m["tokens"])
        tokens += float(m["tokens"])
    return total / tokens if tokens else None


# ----------------------------------------------------------------------------- the hooks of the loop
