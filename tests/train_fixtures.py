"""Tiny trainer configs shared by the trainer tests, and the workers of the subprocess tests.

``python tests/train_fixtures.py PROCESS_ID PORT OUT_JSON [SPEC_JSON]`` is one process of a
2-process CPU job: 4 devices each, gloo collectives, coordinator on 127.0.0.1.

``python tests/train_fixtures.py fault SPEC_JSON`` is one training process of the fault tests,
which kill, signal or starve it (``tests/test_faults.py``).
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


def worker(process_id: int, port: int, out: str, spec: dict | None = None) -> None:
    """One process of the 2-process job; ``spec`` may hold config ``overrides``, ``stop_after`` and
    ``straight`` (then train again from step 0 without checkpoints and report that digest too).

    A preemption (SIGTERM to either process) ends both at the same step with exit status 143.
    """
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from solarjax.train import model_config, train

    spec = spec or {}
    config = tiny_config(**{"distributed.enabled": True, "distributed.coordinator_address": f"127.0.0.1:{port}",
                            "distributed.num_processes": 2, "distributed.process_id": process_id,
                            "train.steps": 3, **spec.get("overrides", {})})
    summary = train(config, params=numpy_params(model_config(config)),
                    train_data=process_dataset(process_id, 2, config.train.batch_size // 2),
                    stop_after=spec.get("stop_after"))
    result = {"losses": summary["losses"], "devices": jax.device_count(), "local": jax.local_device_count(),
              "start_step": summary["start_step"], "params_sha256": params_digest(summary["params"])}
    if spec.get("straight"):  # the same steps again from step 0, uninterrupted and without checkpoints
        config.checkpoint.dir, config.logging.jsonl = None, None
        straight = train(config, params=numpy_params(model_config(config)),
                         train_data=process_dataset(process_id, 2, config.train.batch_size // 2),
                         stop_after=spec.get("stop_after"))
        result["straight_sha256"] = params_digest(straight["params"])
    with open(out, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


def params_digest(params) -> str:
    """SHA-256 of every param's bytes (gathered to this host), for bit-exact comparisons across processes."""
    import hashlib

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        if not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()


def fault_worker(spec: dict) -> None:
    """Train the tiny model as ``spec`` says, reporting errors as the CLI does (one line, exit 1).

    ``overrides``: config items; ``stop_after``: end early; ``fsize_after`` (a step) and
    ``fsize_limit`` (bytes): train to that step, record a digest of the checkpoint files, then
    limit the size of any file this process writes (RLIMIT_FSIZE) and go on training.
    """
    import resource
    import signal

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    from solarjax import train as tr

    config = tiny_config(**spec["overrides"])
    if spec.get("fsize_after"):
        tr.train(config, train_data=process_dataset(0, 1, 8), stop_after=spec["fsize_after"])
        with open(spec["digest_out"], "w") as f:
            json.dump(tree_digest(config.checkpoint.dir), f)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize_limit"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        tr.train(config, train_data=process_dataset(0, 1, 8), stop_after=spec.get("stop_after"))
    except ValueError as err:  # what solarjax.cli.main does with our errors
        print(f"solarjax train: error: {err}", file=sys.stderr)
        sys.exit(1)


def tree_digest(directory: str) -> dict[str, str]:
    """SHA-256 of every file under ``directory``, by relative path."""
    import hashlib
    from pathlib import Path

    root = Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "fault":
        fault_worker(json.loads(sys.argv[2]))
    else:
        worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else None)
