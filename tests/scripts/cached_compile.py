"""Compiles one function with the project's compilation cache in $CIFAR_JAX_CACHE and prints its result (a test helper).

    CIFAR_JAX_CACHE=DIR python tests/scripts/cached_compile.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # The repo root: works with or without `pip install -e .`.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cifar_jax import runtime  # noqa: E402

runtime.enable_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # Cache even this small program.
for n in (3, 4):  # Two programs, two entries.
    print(float(jax.jit(lambda x: jnp.sum(jnp.sin(x) ** 2))(jnp.arange(float(n)))))
