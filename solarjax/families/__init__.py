"""The registry of decoder families: ``ModelConfig.arch`` -> :class:`~solarjax.families.spec.Family`.

Checkpoints name their family in ``config.json``'s ``architectures`` (Hugging Face) or in
``general.architecture`` (GGUF); :func:`for_hf_config` and :func:`for_gguf` map those names here.
Adding a family: a module like ``qwen3.py`` declaring its params and config translation, one line
in ``FAMILIES``, and a test against transformers in ``tests/test_families.py``.
"""

from __future__ import annotations

from typing import Any

from solarjax.families import gemma3, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe
from solarjax.families.spec import Family, Param

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                                   gemma3.FAMILY, mixtral.FAMILY, olmoe.FAMILY,
                                                   qwen2_moe.FAMILY, qwen3_moe.FAMILY)}
HF_ARCHITECTURES: dict[str, str] = {a: f.name for f in FAMILIES.values() for a in f.hf_architectures}
GGUF_ARCHITECTURES: dict[str, str] = {f.gguf_architecture: f.name for f in FAMILIES.values() if f.gguf_architecture}


def get(name: str) -> Family:
    """The family called ``name`` (``ModelConfig.arch``); an unknown name raises ConfigError listing them."""
    family = FAMILIES.get(name)
    if family is None:
        from solarjax.config import ConfigError

        raise ConfigError(f"arch={name!r} is not a known family; families: {sorted(FAMILIES)}")
    return family


def for_hf_config(hf: dict[str, Any]) -> Family | None:
    """The family of a ``config.json`` dict by its ``architectures``, or None."""
    return next((FAMILIES[HF_ARCHITECTURES[a]] for a in hf.get("architectures") or [] if a in HF_ARCHITECTURES), None)


def for_gguf(architecture: str) -> Family | None:
    name = GGUF_ARCHITECTURES.get(architecture)
    return FAMILIES[name] if name else None


def _decay_table() -> dict[str, bool]:
    table: dict[str, bool] = {}
    for family in FAMILIES.values():
        for p in family.layer_params + family.global_params:
            if table.setdefault(p.name, p.decay) != p.decay:
                raise AssertionError(f"leaf {p.name!r} decays in one family and not in another")
    return table


DECAYS: dict[str, bool] = _decay_table()  # leaf name -> weight decay applies (the same in every family)

__all__ = ["FAMILIES", "Family", "Param", "get", "for_hf_config", "for_gguf", "DECAYS"]
