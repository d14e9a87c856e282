"""AOT compilation for TPU topologies on a CPU machine: the XLA TPU compiler is the oracle.

The compile tests need libtpu. It is installed once into a cache directory (``pip install
--target``, never onto the default import path) and the tests are skipped, saying why, only
when that install fails. Each compile runs ``solarjax aot`` in a subprocess, as users do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from solarjax import aot
from solarjax.config import load_config

# A small Llama whose per-chip shards are whole TPU tiles (multiples of 8 x 128), so XLA's byte
# counts are not inflated by tile padding: d 512 / fsdp 4 = 128, head_dim 128, MLP 1024.
TINY = ["--config.model.d_model=512", "--config.model.n_heads=4", "--config.model.n_kv_heads=4",
        "--config.model.ffn_dim=1024", "--config.model.vocab_size=1024",
        "--config.model.n_layers=2", "--config.model.dtype='bfloat16'", "--config.train.batch_size=8",
        "--config.train.seq_len=128"]


def _tiny_params() -> int:
    """Parameter count written out from the shapes (embed, head, 2 x (q k v o, gate up down, 2 norms), norm)."""
    d, v, hd, heads, kv, f, layers = 512, 1024, 128, 4, 4, 1024, 2
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f + 2 * d
    return 2 * v * d + layers * per_layer + d


@pytest.fixture(scope="session")
def libtpu_dir() -> Path:
    path = aot.find_libtpu()
    if path is not None:
        return Path(path).parent.parent
    try:
        return Path(aot.install_libtpu()).parent.parent
    except aot.AotError as err:
        pytest.skip(f"libtpu could not be installed, so TPU AOT compilation cannot run: {err}")


def _run_aot(libtpu_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SOLARJAX_LIBTPU_DIR=str(libtpu_dir), JAX_PLATFORMS="cpu")
    env.pop("TPU_LIBRARY_PATH", None)
    return subprocess.run([sys.executable, "-m", "solarjax.cli", "aot", *args], env=env, text=True,
                          capture_output=True, timeout=300)


def _report(done: subprocess.CompletedProcess) -> dict:
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fsdp_shards_params_and_optimizer_state(libtpu_dir):
    """Per-chip argument bytes (XLA's count) = state / fsdp; replicated (data-parallel) = all of it."""
    total = 3 * 4 * _tiny_params() + 4  # fp32 params + AdamW mu, nu, + the int32 step (+ count scalars)
    fsdp = _report(_run_aot(libtpu_dir, "--config", "tiny", "--topology", "v5p-8", "--json",
                            "--config.mesh.data=1", "--config.mesh.fsdp=4", *TINY))
    assert fsdp["chips"] == 4 and fsdp["topology_name"] == "v5p:2x2x1" and fsdp["fits"]
    # attention="auto" compiles Pallas splash attention for TPU: its Mosaic kernels are in the program
    assert fsdp["attention"] == "splash" and fsdp["kernel_calls"] >= 2
    assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert abs(fsdp["state_bytes_total"] - total) <= 64
    assert fsdp["argument_bytes"] == pytest.approx(total / 4, rel=0.05)

    dp = _report(_run_aot(libtpu_dir, "--config", "tiny", "--topology", "v5p-8", "--json",
                          "--config.mesh.data=4", "--config.mesh.fsdp=1", *TINY))
    assert dp["argument_bytes"] == pytest.approx(total, rel=0.05)
    # Activations follow the batch in both layouts, so temporaries are per-chip sized, not global.
    assert fsdp["temp_bytes"] < 2 * dp["temp_bytes"]
    for report in (fsdp, dp):
        assert 0 < report["xla_flops_per_chip"] < report["program_flops_per_chip"]  # XLA counts the scan once
        assert report["roofline_seconds"] == pytest.approx(report["program_flops_per_chip"] / 459e12)


def test_splash_has_no_quadratic_temporaries(libtpu_dir):
    """At 1024 tokens the (B, H, T, T) scores XLA attention keeps dwarf everything else; splash has none."""
    longer = [a for a in TINY if "seq_len" not in a and "batch_size" not in a] + [
        "--config.train.batch_size=4", "--config.train.seq_len=1024", "--config.model.max_seq_len=1024",
        "--config.mesh.data=1", "--config.mesh.fsdp=4"]
    splash = _report(_run_aot(libtpu_dir, "--config", "tiny", "--topology", "v5p-8", "--json", *longer))
    dense = _report(_run_aot(libtpu_dir, "--config", "tiny", "--topology", "v5p-8", "--json", *longer,
                             "--config.model.attention='xla'"))
    scores = 4 * 1024 * 1024 * 4  # one layer's fp32 scores for this chip's row and 4 heads
    assert splash["attention"] == "splash" and dense["attention"] == "xla" and dense["kernel_calls"] == 0
    assert dense["temp_bytes"] - splash["temp_bytes"] > 2 * scores  # both layers' scores are gone


def test_multislice_compiles_with_data_over_slices(libtpu_dir):
    done = _run_aot(libtpu_dir, "--config", "tiny", "--topology", "v5p-8", "--num-slices", "2", "--json",
                    "--config.mesh.data=2", "--config.mesh.fsdp=4", *TINY)
    report = _report(done)
    assert report["num_slices"] == 2 and report["chips"] == 8 and report["fits"]
    assert report["argument_bytes"] == pytest.approx(report["state_bytes_total"] / 4, rel=0.05)


def test_does_not_fit_exits_nonzero_with_message(libtpu_dir):
    # 64 sequences of 4096 on four 16 GiB v5e chips: the attention scores alone are tens of GB.
    done = _run_aot(libtpu_dir, "--config", "solar_10_7b", "--topology", "v5e-4", "--json",
                    "--config.model.n_layers=2", "--config.mesh.data=1", "--config.mesh.fsdp=4",
                    "--config.train.batch_size=64", "--config.train.seq_len=4096")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "does not fit on v5litepod-4" in done.stderr
    report = _report(done)
    assert not report["fits"] and report["temp_bytes"] > report["hbm_bytes"]


def test_missing_libtpu_says_what_to_run(tmp_path):
    if aot.find_libtpu(tmp_path) is not None:  # importable libtpu or TPU_LIBRARY_PATH: nothing is missing
        pytest.skip("libtpu is importable in this environment")
    env = dict(os.environ, SOLARJAX_LIBTPU_DIR=str(tmp_path / "none"), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "solarjax.cli", "aot", "--config", "tiny", "--topology", "v5p-8"],
                          env=env, text=True, capture_output=True, timeout=120)
    assert done.returncode == 1
    assert "--install-libtpu" in done.stderr and "pip install --no-deps --target" in done.stderr


@pytest.mark.parametrize("name, chips, shape, wrap, tpu", [
    ("v5p-128", 64, (4, 4, 4), (True,) * 3, "v5p-128"),
    ("v4-64", 32, (2, 4, 4), (False,) * 3, "v4-64"),
    ("v5p-8", 4, (2, 2, 1), (False,) * 3, "v5p-8"),
    ("v5litepod-256", 256, (16, 16), (True, True, False), "v5litepod-256"),
    ("v5e-128", 128, (8, 16), (False, True, False), "v5litepod-128"),
    ("v6e-256", 256, (16, 16), (True, True, False), "v6e-256"),
    ("v5p:4x4x12", 192, (4, 4, 12), (True,) * 3, "v5p-384"),
])
def test_topology_names(name, chips, shape, wrap, tpu):
    topo = aot.parse_topology(name)
    assert (topo.num_chips, topo.shape, topo.wrap, topo.name) == (chips, shape, wrap, tpu)
    assert aot.parse_topology(name, num_slices=2).num_chips == 2 * chips


@pytest.mark.parametrize("name, needle", [
    ("v5p-7", "even"), ("v9-8", "unknown TPU generation"), ("v5e-512", "more than"), ("v5p-96", "power of two"),
    ("tpu", "slice name"), ("v5e:4x4x4", "2 dimensions"),
])
def test_bad_topology_names(name, needle):
    with pytest.raises(aot.AotError, match=needle):
        aot.parse_topology(name)


def test_program_flops_counts_every_layer_and_remat():
    """Traced matmul FLOPs = 6N + 12 L H hd T per token (no remat), more with full remat."""
    from solarjax import sharding as shd
    from solarjax import train as tr
    from solarjax.optim import make_optimizer

    config = load_config("tiny")
    cfg = aot.model_shape_config(config)
    mesh = shd.make_mesh(data=-1, devices=jax.devices()[:2])
    optimizer, _ = make_optimizer(config.optim, 10)
    state_sh, batch_sh = tr.train_state_shardings(cfg, optimizer, mesh), shd.batch_sharding(mesh)
    state, batch = tr.abstract_train_state(cfg, optimizer, state_sh), tr.abstract_batch(4, 32, batch_sh)

    def flops(cfg, accum=1):
        step = tr.jit_train_step(tr.make_train_step(cfg, optimizer, grad_accum=accum), state_sh, batch_sh)
        return aot.program_flops(step, state, batch)

    d, v, L, heads, kv, hd, f, seq = 64, 256, 4, 4, 2, 16, 128, 32
    matmul_params = L * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f) + d * v
    # + 2 d v: the chunked cross-entropy recomputes each chunk's logits in its backward pass
    expected = 4 * seq * (6 * matmul_params + 12 * L * heads * hd * seq + 2 * d * v)
    assert flops(cfg) == pytest.approx(expected, rel=1e-6)
    assert flops(cfg, accum=2) == pytest.approx(expected, rel=1e-6)
    # full remat re-runs each layer's forward (2 of the 6 per param) in the backward pass, except
    # w_down's product, which the backward never reads (the layer's output is not an input there)
    layer_fwd = 4 * seq * (2 * (matmul_params - d * v) - 2 * L * d * f + 4 * L * heads * hd * seq)
    assert flops(cfg.replace(remat="full")) == pytest.approx(expected + layer_fwd, rel=1e-6)


def test_moe_compiles_for_tpu_with_megablox_experts(libtpu_dir):
    """A Mixtral-shaped step with experts sharded over fsdp compiles for TPU (Megablox grouped
    matmuls: libtpu cannot compile lax.ragged_dot there), and every expert FLOP is counted once."""
    moe = ["--config.model.dtype='bfloat16'", "--config.mesh.data=1", "--config.mesh.fsdp=4",
           "--config.model.d_model=128", "--config.model.ffn_dim=256",  # whole Megablox tiles
           "--config.train.batch_size=8", "--config.train.seq_len=128"]
    report = _report(_run_aot(libtpu_dir, "--config", "tiny_moe", "--topology", "v5p-8", "--json", *moe))
    dense = _report(_run_aot(libtpu_dir, "--config", "tiny_moe", "--topology", "v5p-8", "--json", *moe,
                             "--config.model.moe_dispatch='dense'"))
    assert report["fits"] and report["kernel_calls"] > dense["kernel_calls"]  # the Megablox kernels
    # dense dispatch runs all 4 experts where Megablox runs 2 per token
    assert report["program_flops_per_chip"] < dense["program_flops_per_chip"]
    assert report["program_flops_per_chip"] >= report["model_flops_per_chip"]


def test_maxtext_comparison_pairs_match_both_sides():
    """bench/aot_vs_maxtext.py's pair table (nothing compiled): both sides get the same slice,
    tokens per step, sequence length and model, and the issue's four v5p-128 pairs are there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aot_vs_maxtext", Path(__file__).parent.parent / "bench" / "aot_vs_maxtext.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    v5p = bench.select("v5p-128:*")
    assert [p.name for p in v5p] == ["v5p-128:llama2-7b_s4096_full", "v5p-128:llama2-7b_s8192_full",
                                     "v5p-128:solar_s4096_custom_qkv_context", "v5p-128:solar_s4096_full"]
    for pair in bench.select("*"):
        mt = dict(a.split("=", 1) for a in pair.maxtext_args("DIR")[1:])
        sj = pair.solarjax_args(pair.variants[0])
        flags = dict(a[len("--config."):].split("=", 1) for a in sj if a.startswith("--config."))
        assert mt["compile_topology"] == sj[sj.index("--topology") + 1]
        chips = aot.parse_topology(mt["compile_topology"]).num_chips
        assert int(flags["mesh.fsdp"]) == chips
        assert int(mt["per_device_batch_size"]) * chips == int(flags["train.batch_size"])
        assert mt["max_target_length"] == flags["train.seq_len"]
        assert int(flags["train.batch_size"]) * int(flags["train.seq_len"]) == 8192 * chips
        layers = load_config(sj[sj.index("--config") + 1]).model.n_layers
        assert int(mt.get("base_num_decoder_layers", 32)) == layers
    assert bench.parse_args(["--sides", "solarjax"]).sides == ["solarjax"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--sides", "torch"])
    with pytest.raises(SystemExit, match="no pair matches"):
        bench.select("v9-1:*")


def test_save_qkv_lse_keeps_the_splash_output_once(capsys):
    """splash names its output and log-sum-exp 'attn_lse': save_qkv_attn also keeps attn_out (the same
    values transposed), save_qkv_lse does not; offload_input moves full remat's layer input to host."""
    import jax.numpy as jnp

    from solarjax import attention, model

    base = aot.model_shape_config(load_config("tiny")).replace(
        d_model=256, n_heads=2, n_kv_heads=1, head_dim=128, ffn_dim=512, n_layers=2, dtype="bfloat16",
        attention="splash", max_seq_len=128)
    tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)

    def residuals(remat):  # jax's public report: one line per residual, e.g. 'bf16<host>[2,2,128,256] ...'
        cfg = base.replace(remat=remat)
        loss = lambda p, t: model.forward(p, t, cfg).astype(jnp.float32).mean()  # noqa: E731
        capsys.readouterr()
        with attention.kernels_interpreted():
            jax.ad_checkpoint.print_saved_residuals(loss, model.abstract_params(cfg), tokens)
        return [line.split(" ")[0] for line in capsys.readouterr().out.splitlines() if line.strip()]

    out = lambda lines: sum(r in ("bf16[2,2,128,2,128]", "bf16[2,2,2,128,128]") for r in lines)  # noqa: E731
    assert out(residuals("save_qkv_attn")) == 3  # query, attn_out and the kernel's output
    assert out(residuals("save_qkv_lse")) == 2  # query and the kernel's output
    assert [r for r in residuals("offload_input") if "<host>" in r] == ["bf16<host>[2,2,128,256]"]  # layer inputs


# ----------------------------------------------------------------------------- grown models
# train's own setup (train.init_model on CPU) is the oracle for the config aot compiles.

def _grown(preset: str, upscale: str, **model):
    """``preset`` shrunk to a few-thousand-parameter model (``model`` overrides by field), grown by ``upscale``."""
    import ml_collections

    from solarjax.config import apply_overrides

    config = load_config(preset)
    small = {"d_model": 32, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 64, "vocab_size": 64,
             "max_seq_len": 64, "dtype": "float32", **model}
    config.model = ml_collections.ConfigDict({**config.model.to_dict(), **small})
    apply_overrides(config, ["train.batch_size=4", "train.seq_len=16", "mesh.data=2", "mesh.fsdp=2",
                             "mesh.tensor=1", f"init.upscale={upscale!r}"])
    return config


def _trained_config(config):
    """The ModelConfig of the params ``train`` builds from ``config``, and those params' layer count."""
    from solarjax import sharding as shd
    from solarjax import train as tr

    mesh = shd.mesh_from_config(config.mesh, jax.devices()[:4])
    cfg, params = tr.init_model(config, mesh, shd.rules_from_config(config.mesh.rules))
    return cfg, params


GEMMA_TYPES = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(6)]
GROWN = [
    ("tiny", "solar:m=1+upcycle:experts=4,k=2", {"n_layers": 3}),
    ("tiny", "upcycle:experts=4,k=2,split=2", {"n_layers": 2}),
    ("gemma3_1b", "solar:m=2", {"n_layers": 6, "layer_types": GEMMA_TYPES}),
]


@pytest.mark.parametrize("preset,upscale,model", GROWN, ids=["dus+upcycle", "upcycle", "gemma3-dus"])
def test_aot_compiles_the_model_train_grows(preset, upscale, model):
    config = _grown(preset, upscale, **model)
    cfg, params = _trained_config(config)
    shape = aot.model_shape_config(config)
    assert shape == cfg
    layers = params["layers"]
    assert layers["wq"].shape[0] == shape.n_layers
    if "upcycle" in upscale:
        assert shape.arch == "mixtral" and shape.n_experts == 4 == layers["w_router"].shape[-1]
        assert layers["w_gate"].shape[1] == shape.n_experts
    else:  # solar:m=2 on 6 layers keeps 0-3 then 2-5: each copy keeps its source layer's type
        assert shape.n_layers == 8
        assert list(shape.layer_types) == [GEMMA_TYPES[i] for i in (0, 1, 2, 3, 2, 3, 4, 5)]


def test_upcycled_step_compiles_on_cpu():
    """The upcycled, depth-grown step lowers and compiles (XLA:CPU stands in for the TPU compiler)."""
    config = _grown("tiny", "solar:m=1+upcycle:experts=4,k=2", n_layers=3)
    report = aot.compile_train_step(config, aot.parse_topology("v5p-8"), devices=jax.devices()[:4])
    assert report.params == aot.model_shape_config(config).num_params() and report.compile_seconds > 0
