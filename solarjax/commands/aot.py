"""``solarjax aot``: compile the train step for a TPU pod slice on this (CPU) machine; does it fit?"""

from __future__ import annotations

import argparse
import sys

from solarjax.commands._flags import accept_config_overrides, print_json

EXIT_DOES_NOT_FIT = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aot",
        help="compile the train step ahead of time for a TPU topology: HBM per chip, FLOPs, roofline",
        description="Lower and compile the exact step 'solarjax train' runs, for a TPU slice (v4, v5e, v5p, "
        "v6e; several slices with --num-slices) using compile-only devices from libtpu, without a TPU and "
        "without allocating weights. Prints per-chip HBM (arguments, temporaries, outputs) against the "
        "chip's HBM, FLOPs per step, the roofline step time and the MFU upper bound. Exits with status 3 "
        "when the step does not fit. Override any config field with --config.section.key=value.",
        epilog="Example: solarjax aot --config configs/solar_10_7b_v5p_128.py --topology v5p-128",
    )
    parser.add_argument("--config", required=True, help="config file (configs/<name>.py) or preset name")
    parser.add_argument("--topology", required=True,
                        help="slice name (v5p-128 = 64 chips, v4-64 = 32 chips, v5litepod-256 / v5e-256, v6e-256) "
                        "or an explicit shape (v5p:4x4x8, v5e:16x16)")
    parser.add_argument("--num-slices", type=int, default=1,
                        help="multislice: this many slices over DCN; mesh.data must be a multiple of it")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--install-libtpu", action="store_true",
                        help="if libtpu is missing, pip-install it (~700 MB, once) into ~/.cache/solarjax "
                        "(or $SOLARJAX_LIBTPU_DIR); it is never put on the default import path")
    accept_config_overrides(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax import aot
    from solarjax.config import apply_overrides, load_config

    topo = aot.parse_topology(args.topology, args.num_slices)
    config = load_config(args.config)
    apply_overrides(config, args.overrides)
    aot.use_libtpu(install=args.install_libtpu, accelerator_type=topo.name)
    report = aot.compile_train_step(config, topo)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format())
    if not report.fits:
        print(f"solarjax aot: the step does not fit on {topo.name}: {report.error.rstrip('.')}. Try a larger mesh.fsdp, "
              "--config.model.remat=full, a smaller train.batch_size with train.grad_accum, or a bigger slice.",
              file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0
