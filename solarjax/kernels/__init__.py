"""Hand-written kernels XLA calls through its FFI, each with a pure-JAX fallback (see cpu_int8)."""
