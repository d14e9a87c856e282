"""Tiny trainer configs shared by the trainer tests, and the worker of the 2-process test.

Run as a script (``python tests/train_fixtures.py PROCESS_ID PORT OUT_JSON``) it is one process of
a 2-process CPU job: 4 devices each, gloo collectives, coordinator on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import sys

DOCS = [
    " ".join(f"w{(i * 7 + j * 3) % 23}" for j in range(5 + (i * 11) % 40)) for i in range(64)
]


def tiny_config(**overrides):
    """tiny preset, 2 layers, small batch; overrides are ``key.sub=value`` pairs as dict items."""
    from solarjax.config import apply_overrides, load_config

    config = load_config("tiny")
    values = {"model.n_layers": 2, "train.steps": 6, "train.batch_size": 8, "train.seq_len": 32,
              "train.log_every": 1, "train.eval_every": 0, "train.progress": False, "optim.lr": 3e-3,
              "optim.warmup_steps": 2, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    values.update(overrides)
    apply_overrides(config, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items()])
    return config


def word_tokenizer():
    """A word-level ``tokenizers`` tokenizer over DOCS' vocabulary (ids 0..2 are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 3 + i for i in range(23)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def numpy_params(cfg, seed: int = 0):
    """Random params from NumPy: no init jit to compile (tests that only need *some* weights)."""
    import jax
    import numpy as np

    from solarjax.model import param_shapes

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s)).astype(np.float32), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def process_dataset(process_index: int, process_count: int, batch_size: int, seq_len: int = 32):
    from solarjax import data

    return data.make_dataset(DOCS, word_tokenizer(), seq_len=seq_len, batch_size=batch_size, seed=3,
                             process_index=process_index, process_count=process_count)


class ConcatProcesses:
    """What the 2-process job feeds, as one process: process 0's rows, then process 1's."""

    def __init__(self, process_count: int, batch_size: int):
        self.iters = [iter(process_dataset(i, process_count, batch_size // process_count)) for i in range(process_count)]

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        parts = [next(it) for it in self.iters]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def worker(process_id: int, port: int, out: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from solarjax.train import train

    config = tiny_config(**{"distributed.enabled": True, "distributed.coordinator_address": f"127.0.0.1:{port}",
                            "distributed.num_processes": 2, "distributed.process_id": process_id,
                            "train.steps": 3})
    from solarjax.train import model_config

    summary = train(config, params=numpy_params(model_config(config)),
                    train_data=process_dataset(process_id, 2, config.train.batch_size // 2))
    with open(out, "w") as f:
        json.dump({"losses": summary["losses"], "devices": jax.device_count(), "local": jax.local_device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
