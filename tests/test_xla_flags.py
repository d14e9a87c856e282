"""The XLA flags solarjax sets: merged into what the user set, never over it."""

from __future__ import annotations

import os

from solarjax import xla_flags


def test_flags_merge_without_overriding_the_user(monkeypatch):
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_enable_async_all_gather=false --my_flag=1")
    xla_flags.apply("tpu")
    args = os.environ["LIBTPU_INIT_ARGS"].split()
    assert "--xla_enable_async_all_gather=false" in args and "--my_flag=1" in args
    assert "--xla_enable_async_all_gather=true" not in args
    assert set(xla_flags.TPU_FLAGS) - {"--xla_enable_async_all_gather=true"} <= set(args)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    xla_flags.apply("gpu")
    assert os.environ["XLA_FLAGS"] == " ".join(xla_flags.GPU_FLAGS)


def test_opt_out_and_cpu_set_nothing(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("SOLARJAX_XLA_FLAGS", "0")
    xla_flags.apply("gpu")
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.delenv("SOLARJAX_XLA_FLAGS")
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    xla_flags.apply("cpu")
    assert "XLA_FLAGS" not in os.environ and "LIBTPU_INIT_ARGS" not in os.environ
