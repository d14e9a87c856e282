"""Compile the real train step for a TPU pod slice ahead of time, on a machine without TPUs.

With ``libtpu`` available, ``jax.experimental.topologies`` hands out *compile-only* devices for
any TPU topology (v4/v5e/v5p/v6e, several slices too). Lowering ``solarjax.train``'s step with
abstract ``ShapeDtypeStruct`` inputs against a mesh of those devices and compiling it gives the
XLA TPU compiler's own verdict: whether the step fits in HBM, and how many bytes per chip the
arguments (params + optimizer state), temporaries and outputs take. No weights are allocated.

Two findings shape this module:

- ``compiled.cost_analysis()["flops"]`` is **per chip** but counts a ``while`` loop body once,
  and the decoder runs its layers in a ``lax.scan``: for a 48-layer model it reports roughly the
  FLOPs of one layer plus the head. So the step's FLOPs are counted from the traced program
  instead (``program_flops``: every ``dot_general``, scan bodies times their length, remat
  recomputation included) and divided by the chip count; XLA's raw figure is kept for reference.
- libtpu must not sit in the default environment (every CPU jax run would try to start a TPU).
  It is installed into a cache directory (``pip install --target``) and loaded through
  ``TPU_LIBRARY_PATH`` only by this process, which keeps ``jax.devices()`` on the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from solarjax.chips import PEAK_FLOPS
from solarjax.config import ConfigError


class AotError(ValueError):
    """A topology, libtpu setup or config that cannot be compiled ahead of time."""


# ----------------------------------------------------------------------------- chips and topologies


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. ``megacore``: the slice name counts TensorCores, two per chip."""

    name: str
    hbm_bytes: float
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    dims: int  # 3: v4/v5p cubes, 2: v5e/v6e grids
    megacore: bool
    max_chips: int  # largest single slice


GiB = 1024**3
# HBM: what XLA's TPU compiler reports as available to a program (its out-of-memory message, libtpu
# 0.0.42), a little under the marketing figure (v4 32 GiB, v5e 16 GiB, v5p 95 GB, v6e 32 GiB).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 30.75 * GiB, PEAK_FLOPS["TPU v4"], 1.2e12, 3, True, 4096),
    "v5e": Chip("v5e", 15.75 * GiB, PEAK_FLOPS["TPU v5e"], 819e9, 2, False, 256),
    "v5p": Chip("v5p", 95.74e9, PEAK_FLOPS["TPU v5p"], 2.765e12, 3, True, 8960),
    "v6e": Chip("v6e", 31.25 * GiB, PEAK_FLOPS["TPU v6e"], 1.64e12, 2, False, 256),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e", "v6lite": "v6e"}
# libtpu's topology-name prefixes
_TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice shape (in chips), repeated ``num_slices`` times over the data-center network."""

    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def name(self) -> str:
        """The Cloud TPU accelerator type, e.g. ``v5p-128`` (TensorCores for v4/v5p, chips otherwise)."""
        count = self.chips_per_slice * (2 if self.chip.megacore else 1)
        prefix = "v5litepod" if self.chip.name == "v5e" else self.chip.name
        return f"{prefix}-{count}"

    @property
    def topology_name(self) -> str:
        return f"{_TOPOLOGY_PREFIX[self.chip.name]}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        shape3 = tuple(self.shape) + (1,) * (3 - len(self.shape))
        if self.chip.dims == 2 and self.chips_per_slice <= 8:
            return shape3  # v5e/v6e slices up to 8 chips are one host
        return tuple(min(s, b) for s, b in zip(shape3, (2, 2, 1)))

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus wrap-around links: full v4/v5p cubes (every side a multiple of 4), 16-chip v5e/v6e sides."""
        if self.chip.dims == 3:
            return (all(s % 4 == 0 for s in self.shape),) * 3
        return tuple(s == 16 for s in self.shape) + (False,)

    @property
    def hosts(self) -> int:
        return self.num_slices * max(1, self.chips_per_slice // math.prod(self.chips_per_host_bounds))


def default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's default slice shape for a power-of-two chip count (v5p-128 -> 4x4x4, v5e-256 -> 16x16)."""
    if chips < 1 or chips & (chips - 1):
        raise AotError(f"{chips} chips is not a power of two; name the shape explicitly, e.g. 'v5p:4x4x12'")
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        if dims == 3 and shape == [1, 1, 1]:
            shape = [2, 1, 1]
            continue
        if dims == 3 and shape == [2, 1, 1]:
            shape = [2, 2, 1]
            continue
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(spec: str, num_slices: int = 1) -> Topology:
    """``v5p-128`` / ``v5litepod-256`` / ``v4-64`` / ``v6e-256`` or an explicit ``v5p:4x4x8``."""
    text = str(spec).strip().lower()
    if not isinstance(num_slices, int) or num_slices < 1:
        raise AotError(f"num_slices must be a positive integer, got {num_slices!r}")
    named = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    explicit = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", text)
    if not (named or explicit):
        raise AotError(f"topology {spec!r} is neither a slice name like 'v5p-128', 'v5litepod-256', 'v4-64', "
                       "'v6e-256' nor an explicit shape like 'v5p:4x4x4' or 'v5e:16x16'")
    gen = (named or explicit).group(1)
    gen = _ALIASES.get(gen, gen)
    if gen not in CHIPS:
        raise AotError(f"topology {spec!r}: unknown TPU generation {gen!r}; known: {sorted(CHIPS)}")
    chip = CHIPS[gen]
    if named:
        count = int(named.group(2))
        if chip.megacore and count % 2:
            raise AotError(f"topology {spec!r}: {gen} slice names count TensorCores (two per chip), so the "
                           "number must be even, e.g. v5p-128 = 64 chips")
        shape = default_shape(count // 2 if chip.megacore else count, chip.dims)
    else:
        shape = tuple(int(s) for s in explicit.group(2).split("x"))
        if len(shape) == 3 and chip.dims == 2 and shape[2] == 1:
            shape = shape[:2]
        if len(shape) != chip.dims or min(shape) < 1:
            raise AotError(f"topology {spec!r}: {gen} slices have {chip.dims} dimensions, e.g. "
                           f"{'v5p:4x4x4' if chip.dims == 3 else 'v5e:16x16'}")
    topo = Topology(chip, shape, num_slices)
    if topo.chips_per_slice > chip.max_chips:
        raise AotError(f"topology {spec!r}: {topo.chips_per_slice} chips is more than a {gen} slice holds "
                       f"({chip.max_chips}); use num_slices for more")
    return topo


# ----------------------------------------------------------------------------- libtpu


def libtpu_requirement() -> str:
    """The libtpu pin of the installed jax (its ``tpu`` extra), e.g. ``libtpu==0.0.42.*``."""
    for req in metadata.requires("jax") or []:
        if req.replace(" ", "").startswith("libtpu") and 'extra=="tpu"' in req.replace(" ", "").replace("'", '"'):
            return req.split(";")[0].strip()
    return "libtpu"


def libtpu_cache_dir() -> Path:
    """Where ``--install-libtpu`` puts libtpu: ``$SOLARJAX_LIBTPU_DIR`` or ``~/.cache/solarjax/libtpu-<jax>``."""
    import jax

    if os.environ.get("SOLARJAX_LIBTPU_DIR"):
        return Path(os.environ["SOLARJAX_LIBTPU_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "solarjax" / f"libtpu-{jax.__version__}"


def find_libtpu(cache_dir: Path | None = None) -> str | None:
    """Path of ``libtpu.so``: ``$TPU_LIBRARY_PATH``, an importable ``libtpu`` or the cache directory."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "libtpu.so"
        if path.is_file():
            return str(path)
    path = (cache_dir or libtpu_cache_dir()) / "libtpu" / "libtpu.so"
    return str(path) if path.is_file() else None


def install_command(cache_dir: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(cache_dir or libtpu_cache_dir()),
            libtpu_requirement()]


def install_libtpu(cache_dir: Path | None = None) -> str:
    """``pip install --target`` libtpu into the cache (atomically: a temp dir renamed into place)."""
    dest = cache_dir or libtpu_cache_dir()
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = install_command(tmp)
    print(f"installing {cmd[-1]} into {dest} (about 700 MB) ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AotError(f"could not install {cmd[-1]}: {' '.join(cmd)} failed:\n{done.stdout[-2000:]}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    path = find_libtpu(dest)
    if path is None:
        raise AotError(f"installed {cmd[-1]} into {dest}, but {dest}/libtpu/libtpu.so is missing")
    return path


def _on_tpu_vm() -> bool:
    return any(Path("/dev").glob("accel*")) or any(Path("/dev").glob("vfio/[0-9]*"))


def use_libtpu(install: bool = False, accelerator_type: str = "v5p-8") -> str:
    """Make libtpu loadable by this process only, keeping jax's own backend on the CPU."""
    import jax

    path = find_libtpu()
    if path is None:
        if not install:
            raise AotError("AOT compilation for TPU needs libtpu, which is not installed. Either pass "
                           "--install-libtpu (downloads ~700 MB once into the cache), or run:\n  "
                           + " ".join(install_command()))
        path = install_libtpu()
    os.environ["TPU_LIBRARY_PATH"] = path
    from solarjax import xla_flags

    xla_flags.apply("tpu")  # compile with the flags a pod run uses
    # Without these, libtpu looks for TPU metadata and prints warnings; they describe no real chips.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if not _on_tpu_vm():  # compile-only: several AOT processes may share libtpu (no /tmp/libtpu_lockfile)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized() and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    return path


def topology_devices(topo: Topology) -> list:
    """Compile-only devices of the slice(s); one per chip (v4/v5p megacore: both cores as one device)."""
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.topology_name,
            chip_config_name="megacore" if topo.chip.megacore else "default",
            chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=topo.num_slices, wrap=topo.wrap)
    except Exception as err:  # noqa: BLE001 - libtpu's errors are runtime errors without a name
        raise AotError(f"libtpu rejected topology {topo.topology_name} x {topo.num_slices} slice(s): {err}") from err
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise AotError(f"topology {topo.topology_name} x {topo.num_slices} gave {len(devices)} devices, "
                       f"expected {topo.num_chips} (one per chip)")
    return devices


# ----------------------------------------------------------------------------- mesh


def aot_mesh(mesh_config: Mapping[str, Any], devices: list, num_slices: int = 1):
    """The trainer's ``(data, fsdp, tensor)`` mesh; with several slices the ``data`` axis spans them.

    Only the gradient all-reduce should cross the slow data-center network, so ``data`` is split
    into ``num_slices`` (over DCN) x ``data / num_slices`` (inside a slice) and fsdp/tensor stay
    inside a slice (``mesh_utils.create_hybrid_device_mesh``).
    """
    from jax.sharding import Mesh

    from solarjax import sharding as shd

    if num_slices == 1:
        return shd.mesh_from_config(mesh_config, devices)
    data, fsdp, tensor = shd.mesh_shape(mesh_config["data"], mesh_config["fsdp"], mesh_config["tensor"], len(devices))
    if data % num_slices:
        raise shd.ShardingError(f"mesh.data={data} must be a multiple of num_slices={num_slices}: the data axis "
                                "spans the slices (fsdp and tensor stay inside a slice)")
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh((data // num_slices, fsdp, tensor), (num_slices, 1, 1), devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, shd.MESH_AXES)


# ----------------------------------------------------------------------------- FLOPs


def _sub_jaxprs(value: Any):
    from jax.extend import core

    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _grouped_matmul_flops(eqn) -> float:
    """A kernel with a data-dependent grid: Megablox's grouped matmuls, where every row goes through
    one group. ``gmm``: rows (m, k) -> (m, n), 2 m k n; ``tgmm`` (the weight gradient): rows (m, k)
    and (m, n) -> (groups, k, n), 2 m k n. Anything else is not counted."""
    out = eqn.outvars[0].aval.shape
    flats = [v.aval.shape for v in eqn.invars if len(getattr(v.aval, "shape", ())) == 2]
    if len(out) == 2:
        lhs = next((s for s in flats if s[0] == out[0]), None)
        return 0.0 if lhs is None else 2.0 * out[0] * out[1] * lhs[1]
    if len(out) == 3:
        rows = next((s[0] for s in flats if s[1] == out[1]), None)
        return 0.0 if rows is None else 2.0 * rows * out[1] * out[2]
    return 0.0


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of a jaxpr: 2 x output size x contracted size per ``dot_general``.

    A Pallas kernel (splash attention) counts its body once per grid point, i.e. as if no block
    were skipped: the same dense count XLA's attention has, so remat ratios stay comparable.

    Scan bodies count ``length`` times, the larger branch of a ``cond`` once, a ``while`` body once
    (its trip count is unknown). Elementwise work is left out: next to the matmuls of a decoder
    it is noise, and the MXU peak is a matmul peak.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
            continue
        if name == "pallas_call":  # a kernel body runs once per grid point (splash: dense count)
            grid = eqn.params["grid_mapping"].grid
            if all(isinstance(g, int) for g in grid):
                total += math.prod(grid) * jaxpr_flops(eqn.params["jaxpr"])
            else:
                total += _grouped_matmul_flops(eqn)
            continue
        if name == "ragged_dot_general":  # every lhs row meets one group: 2 x |lhs| x rhs free dims
            numbers = eqn.params["ragged_dot_dimension_numbers"]
            (_, rhs_contract), _ = numbers.dot_dimension_numbers
            lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
            skip = set(rhs_contract) | set(numbers.rhs_group_dimensions)
            total += 2.0 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in skip)
            continue
        subs = [jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not subs:
            continue
        if name == "cond":
            total += max(subs)
        elif name == "shard_map":  # the body is one shard's work; every device runs it
            total += sum(subs) * math.prod(eqn.params["mesh"].shape.values())
        else:
            total += sum(subs) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def program_flops(jitted, *args) -> float:
    """Global matmul FLOPs of one call of a jitted function (remat recomputation included)."""
    return jaxpr_flops(jitted.trace(*args).jaxpr.jaxpr)


# ----------------------------------------------------------------------------- compile and report


@dataclasses.dataclass
class AotReport:
    """What the TPU compiler says about one train step; sizes are per chip unless named total."""

    topology: str
    topology_name: str
    num_slices: int
    chips: int
    hosts: int
    mesh: dict[str, int]
    params: int
    batch_size: int
    seq_len: int
    grad_accum: int
    remat: str
    tokens_per_step: int
    hbm_bytes: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    state_bytes_total: int  # params + optimizer state + step, all chips together (logical)
    state_bytes_per_chip: int  # the same, from the shardings (logical, before TPU tile padding)
    program_flops_per_chip: float  # traced matmul FLOPs / chips (remat recompute included)
    model_flops_per_chip: float  # 6N + attention per token (the MFU convention) / chips
    xla_flops_per_chip: float | None  # compiled.cost_analysis(): per chip, loop bodies counted once
    peak_flops: float
    compile_seconds: float
    attention: str = ""  # the kernel cfg.attention resolves to on this topology (auto -> splash)
    kernel_calls: int = 0  # Mosaic (Pallas) custom calls in the compiled program: splash is really in it
    host_temp_bytes: int = 0  # host (pinned) memory of remat residuals an offload policy moves off the chip
    libtpu: str = ""  # the libtpu release that compiled it
    fits: bool = True
    error: str | None = None

    @property
    def total_bytes(self) -> int:
        """Peak HBM the program needs: inputs + temporaries + outputs not aliased to (donated) inputs + code."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def roofline_seconds(self) -> float:
        """Step time if every executed FLOP ran at the chip's bf16 peak (communication ignored)."""
        return self.program_flops_per_chip / self.peak_flops

    @property
    def mfu_upper_bound(self) -> float:
        """Model FLOPs / executed FLOPs: the MFU at 100% hardware utilisation (remat lowers it)."""
        return self.model_flops_per_chip / self.program_flops_per_chip if self.program_flops_per_chip else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, roofline_seconds=self.roofline_seconds,
                   mfu_upper_bound=self.mfu_upper_bound,
                   roofline_tokens_per_s=self.tokens_per_step / self.roofline_seconds if self.roofline_seconds else None,
                   hbm_fraction=self.total_bytes / self.hbm_bytes)
        return out

    def format(self) -> str:
        gb = lambda b: f"{b / 1e9:8.2f} GB"  # noqa: E731
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        rows = [
            ("topology", f"{self.topology} ({self.topology_name}, {self.num_slices} slice(s)): {self.chips} chips, "
                         f"{self.hosts} hosts"),
            ("mesh", mesh),
            ("model", f"{self.params:,} params, remat {self.remat}, attention {self.attention} "
                      f"({self.kernel_calls} Pallas kernel calls)"),
            ("step", f"batch {self.batch_size} x seq {self.seq_len} = {self.tokens_per_step:,} tokens, "
                     f"grad_accum {self.grad_accum}"),
            ("compile", f"{self.compile_seconds:.1f} s"),
            ("", ""),
            ("HBM per chip", ""),
            ("  arguments", f"{gb(self.argument_bytes)}  (params + AdamW state: {gb(self.state_bytes_per_chip).strip()} "
                            f"logical = {gb(self.state_bytes_total).strip()} / {self.state_bytes_total / max(self.state_bytes_per_chip, 1):.0f})"),
            ("  temporaries", gb(self.temp_bytes)),
            ("  outputs", f"{gb(self.output_bytes)}  ({gb(self.alias_bytes).strip()} aliased to donated arguments)"),
            ("  program", gb(self.code_bytes)),
            ("  total", f"{gb(self.total_bytes)}  of {gb(self.hbm_bytes).strip()} "
                        f"({100 * self.total_bytes / self.hbm_bytes:.0f}%)  {'fits' if self.fits else 'DOES NOT FIT'}"),
            ("", ""),
            ("FLOPs per chip", ""),
            ("  executed", f"{self.program_flops_per_chip:.3e}  (traced matmuls, remat recompute included)"),
            ("  model", f"{self.model_flops_per_chip:.3e}  (6N + attention per token)"),
            ("  XLA cost", f"{self.xla_flops_per_chip:.3e}  (cost_analysis: per chip, scan bodies counted once)"
             if self.xla_flops_per_chip is not None else "n/a"),
            ("roofline step", f"{self.roofline_seconds:.3f} s at {self.peak_flops / 1e12:.0f} TFLOP/s bf16 "
                              f"({self.tokens_per_step / self.roofline_seconds:,.0f} tokens/s)"
             if self.roofline_seconds else "n/a"),
            ("MFU upper bound", f"{100 * self.mfu_upper_bound:.1f}%"),
        ]
        if self.error and not self.argument_bytes:  # the compiler itself refused: no memory analysis
            rows = rows[:5] + [("", ""), ("compiler", self.error)] + rows[13:]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" if k or v else "" for k, v in rows)


def _nbytes(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _shard_nbytes(tree) -> int:
    """Bytes of one device's shards (the largest per leaf), from the shardings alone."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def model_shape_config(config):
    """``ModelConfig`` of the trained model: ``config.model``, grown by ``init.upscale`` through the
    one growth entry point ``train`` uses (DUS plans, ``upcycle:`` and ``+`` chains, Gemma 3's
    ``layer_types`` re-indexed), so aot compiles the model ``train`` would build."""
    from solarjax.train import model_config

    cfg = model_config(config).replace(param_dtype="float32")
    if config.init.upscale:
        from solarjax.growth import grown_config

        cfg = grown_config(cfg, config.init.upscale, allow_shallower=config.init.get("allow_shallower", False))
        cfg = cfg.replace(param_dtype="float32")
    return cfg


def compile_train_step(config, topo: Topology, devices: list | None = None) -> AotReport:
    """Lower and compile ``solarjax train``'s step for ``topo``; a report (``fits=False`` on OOM)."""
    from solarjax import sharding as shd
    from solarjax.attention import resolve as resolve_attention
    from solarjax.train import abstract_batch, abstract_train_state, build_step

    devices = devices if devices is not None else topology_devices(topo)
    mesh = aot_mesh(config.mesh, devices, topo.num_slices)
    rules = shd.rules_from_config(config.mesh.rules)
    tc = config.train
    shd.check_batch(tc.batch_size, mesh, rules, grad_accum=tc.grad_accum, process_count=topo.hosts)
    cfg = model_shape_config(config)
    if tc.seq_len > cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    built = build_step(config, mesh, rules, cfg)  # train()'s own optimizer, loss, step and jit
    step = built.step
    state = abstract_train_state(cfg, built.optimizer, built.state_shardings)
    batch = abstract_batch(tc.batch_size, tc.seq_len, built.batch_shardings)
    tokens = tc.batch_size * tc.seq_len
    report = AotReport(
        topology=topo.name, topology_name=topo.topology_name, num_slices=topo.num_slices, chips=topo.num_chips,
        hosts=topo.hosts, mesh={k: int(v) for k, v in mesh.shape.items()}, params=cfg.num_params(),
        batch_size=tc.batch_size, seq_len=tc.seq_len, grad_accum=tc.grad_accum, remat=cfg.remat,
        tokens_per_step=tokens, hbm_bytes=topo.chip.hbm_bytes, argument_bytes=0, output_bytes=0, alias_bytes=0,
        temp_bytes=0, code_bytes=0, state_bytes_total=_nbytes(state), state_bytes_per_chip=_shard_nbytes(state),
        program_flops_per_chip=program_flops(step, state, batch) / topo.num_chips,
        model_flops_per_chip=cfg.flops_per_token(tc.seq_len) * tokens / topo.num_chips,
        xla_flops_per_chip=None, peak_flops=topo.chip.peak_flops, compile_seconds=0.0,
        attention=resolve_attention(cfg.attention, cfg.compute_dtype, "tpu"))
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - XLA raises a bare runtime error for out-of-memory
        report.compile_seconds = time.perf_counter() - start
        if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
            report.fits, report.error = False, str(err).strip().splitlines()[0]
            report.temp_bytes = _parse_oom_temp_bytes(report.error)
            return report
        raise
    report.compile_seconds = time.perf_counter() - start
    report.kernel_calls = compiled.as_text().count("tpu_custom_call")
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    report.host_temp_bytes = int(getattr(mem, "host_temp_size_in_bytes", 0) or 0)
    report.libtpu = _libtpu_version()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.xla_flops_per_chip = float(cost["flops"]) if cost and "flops" in cost else None
    report.fits = report.total_bytes <= report.hbm_bytes
    if not report.fits:
        report.error = (f"needs {report.total_bytes / 1e9:.2f} GB per chip, the chip has {report.hbm_bytes / 1e9:.2f} GB")
    return report


def _libtpu_version() -> str:
    """The libtpu release loaded (its dist-info beside ``libtpu/``), '' when unknown."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    infos = sorted(Path(path).parent.parent.glob("libtpu-*.dist-info")) if path else []
    return infos[-1].name[len("libtpu-"):-len(".dist-info")] if infos else ""


_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}


def _parse_oom_temp_bytes(message: str) -> int:
    """XLA's 'memory required for HLO temporaries (1.36T) exceeds available HBM (95.74G)' -> bytes."""
    found = re.search(r"temporaries \(([\d.]+)([KMGTP]?)", message)
    return int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0
