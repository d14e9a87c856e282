"""A :class:`Task`: what differs between pretraining, SFT and DPO around the one loop."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding

from solarjax import sharding as shd
from solarjax.config import ModelConfig
from solarjax.losses import Batch, LossFn, default_loss
from solarjax.model import Params
from solarjax.train.metrics import evaluate, mfu
from solarjax.train.setup import make_data
from solarjax.train.step import global_batch


class Task:
    """What a kind of training plugs into the one loop of :func:`train`: next-token pretraining here.

    SFT runs with these defaults (its packed rows carry the response mask); DPO overrides them
    (:class:`solarjax.dpo.DPOTask`). Every guard of the loop (resume, preemption, divergence,
    checkpoint errors) therefore applies to all three.
    """

    name = "train"  # progress-bar label
    rows_per_example = 1  # batch rows per unit of train.batch_size (DPO: a chosen and a rejected row)

    def check(self, config) -> None:
        """Reject a config this task cannot run, before anything loads or compiles."""

    def setup(self, config, cfg: ModelConfig, params: Params, mesh: Mesh, rules) -> None:
        """Called once the params are on the mesh, before the first (donating) step."""
        self.config, self.cfg, self.mesh = config, cfg, mesh
        self.tokens_per_s = self.mfu = None

    def datasets(self, config, cfg: ModelConfig, out_dir: epath.Path | None):
        """``(train data, eval data | None)`` when the caller passed none."""
        train_ds, eval_ds, _ = make_data(config, cfg, out_dir)
        return train_ds, eval_ds

    def batch_shardings(self, mesh: Mesh, rules) -> Mapping[str, NamedSharding]:
        return shd.batch_sharding(mesh, rules)

    def loss_fn(self, mesh: Mesh, rules) -> LossFn:
        config = getattr(self, "config", None)  # set by setup()
        train = {} if config is None else config.train
        return default_loss(mesh, rules, recompute_logits=train.get("loss_recompute_logits", True),
                            chunk_tokens=train.get("loss_chunk_tokens"))

    def batch(self, local: Mapping[str, np.ndarray], shardings) -> Batch:
        """This process' rows -> the global batch the step takes."""
        return global_batch(local, shardings)

    def record(self, fetched: list[dict[str, float]], steps_per_s: float | None) -> dict[str, Any]:
        """The log record of a window of steps (their host metrics, and the timed step rate)."""
        tc = self.config.train
        if steps_per_s:
            self.tokens_per_s = steps_per_s * tc.batch_size * tc.seq_len
            self.mfu = mfu(self.tokens_per_s, self.cfg, tc.seq_len, self.mesh.size)
        last = fetched[-1]
        moe_figures = {k: np.mean([m[k] for m in fetched], axis=0).round(6).tolist() for k in last
                       if k.startswith(("moe_", "router_", "expert_"))}  # expert_load: a list, one per expert
        return {"loss": float(np.mean([m["loss"] for m in fetched])), "grad_norm": last["grad_norm"],
                "lr": last.get("lr"), "tokens_per_s": self.tokens_per_s, "mfu": self.mfu, **moe_figures}

    def evaluate(self, eval_step, params: Params, eval_data, num_batches: int, shardings) -> dict[str, Any] | None:
        loss = evaluate(eval_step, params, eval_data, num_batches, shardings)
        return None if loss is None else {"eval_loss": loss}

    def summary(self, evals: list[dict[str, Any]]) -> dict[str, Any]:
        """Task-specific fields of the summary :func:`train` returns."""
        return {"eval": [[e["step"], e["eval_loss"]] for e in evals],
                "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
                "tokens_per_s": self.tokens_per_s, "mfu": self.mfu}


# ----------------------------------------------------------------------------- guards of the loop
