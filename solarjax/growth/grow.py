"""One growth entry point: a *growth spec* is DUS plan specs (:mod:`solarjax.growth.plans`) and
``upcycle:`` steps (:mod:`solarjax.growth.upcycle`) chained with ``+`` (``"solar:m=8+upcycle:experts=8,k=2"``).
:func:`grown_config` says what a spec makes of a config before any array is touched; :func:`grow`
applies it to params; ``train``, ``aot``, ``upscale`` and the studies all go through these two.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from solarjax.config import ConfigError, ModelConfig
from solarjax.growth import dus
from solarjax.growth.plans import check_deeper, parse_plan_spec
from solarjax.growth.upcycle import SPEC_EXAMPLE, parse_upcycle_spec, upcycle, upcycled_config

Params = dict[str, Any]

STEP_SEPARATOR = re.compile(r"(?<![0-9][eE])\+")  # "+" between steps; "1e+3" is a number


def growth_steps(spec: str) -> list[str]:
    """The steps of a growth spec: DUS plan specs and ``upcycle:...`` steps joined by ``+``."""
    steps = [s.strip() for s in STEP_SEPARATOR.split(spec.strip())] if isinstance(spec, str) else []
    if not steps or not all(steps):
        raise ConfigError(f"empty step in growth spec {spec!r}; e.g. 'solar:m=8', '{SPEC_EXAMPLE}' or "
                          "'solar:m=8+upcycle:experts=8,k=2'")
    return steps


def is_upcycle(step: str) -> bool:
    return step.replace(" ", "").startswith("upcycle:")


def grown_config(cfg: ModelConfig, spec: str, *, allow_shallower: bool = False) -> ModelConfig:
    """The config a growth spec gives ``cfg``, with every step checked, before any array is touched;
    a DUS step that leaves the model no deeper is refused unless ``allow_shallower``
    (:func:`solarjax.check_deeper`)."""
    for step in growth_steps(spec):
        if is_upcycle(step):
            cfg = upcycled_config(cfg, parse_upcycle_spec(step))
        else:
            plan = parse_plan_spec(step, cfg.n_layers)
            if not allow_shallower:
                check_deeper(plan, cfg.n_layers, step)
            cfg = dus.plan_config(cfg, plan)
    return cfg


def grow(params: Params, cfg: ModelConfig, spec: str, key: Any = None, *,
         allow_shallower: bool = False) -> tuple[Params, ModelConfig]:
    """Apply a growth spec (DUS plans and upcycling, in order) to ``params``; returns ``(params, cfg)``
    like :func:`solarjax.growth.dus.upscale_params`. ``key`` seeds the upcycling draws (default ``key(0)``);
    ``allow_shallower`` as in :func:`grown_config`."""
    import jax

    grown_config(cfg, spec, allow_shallower=allow_shallower)  # every step checked before the first one runs
    key = jax.random.key(0) if key is None else key
    for i, step in enumerate(growth_steps(spec)):
        if is_upcycle(step):
            how = parse_upcycle_spec(step)
            cfg, params = upcycle(cfg, params, **{f.name: getattr(how, f.name) for f in dataclasses.fields(how)},
                                  key=jax.random.fold_in(key, i))
        else:
            params, cfg = dus.upscale_params(params, cfg, step)
    return params, cfg


def grow_loaded(src: Any, dst: Any, spec: str, *, dtype: str | None = None, out_format: str | None = None,
                max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = False,
                allow_shallower: bool = False) -> tuple[ModelConfig, ModelConfig]:
    """Grow any model :mod:`solarjax.loading` reads by a growth spec in memory and save it (``solarjax
    upscale`` for every source it does not stream): an HF directory with the source's tokenizer
    (default for HF and GGUF sources; an upcycled model is a ``MixtralForCausalLM``) or an Orbax
    checkpoint. The spec, the output's format and ``dst`` are checked before any array is read.
    Returns ``(source cfg, grown cfg)``."""
    from solarjax import ckpt, hf, loading
    from solarjax import safetensors_io as st
    from solarjax.outputs import check_destination

    source = loading.detect(src)
    out_format = out_format or ("hf" if source.kind in ("gguf", "hf") else "orbax")
    if out_format not in ("hf", "orbax"):
        raise hf.CheckpointError(f"unknown output format {out_format!r}; use 'hf' or 'orbax'")
    check_destination(dst, overwrite=overwrite, sources=(src,))
    target = grown_config(loading.read_config(source), spec, allow_shallower=allow_shallower)
    if out_format == "hf":
        hf.config_to_hf(target)  # a layout transformers cannot load (fine-grained experts) fails here
    cfg_in, params, _ = loading.load(source, dtype=dtype and st.canonical_dtype(dtype), progress=progress)
    params, cfg = grow(params, cfg_in, spec, allow_shallower=allow_shallower)
    if out_format == "orbax":
        ckpt.save_params(dst, params, cfg, overwrite=overwrite, sources=(src,), verb="upscale",
                         beside=loading.tokenizer_copier(source))  # a run's whole tokenizer goes with it
    else:
        from solarjax.gguf import hf_side_files

        gguf_files = hf_side_files(source.weights) if source.kind == "gguf" else None
        hf.save_hf(params, cfg, dst, source_dir=source.weights if source.kind == "hf" else source.tokenizer_dir,
                   extra_files=gguf_files, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                   sources=(src,), verb="upscale")
    return cfg_in, cfg
