"""Test-session set-up: four CPU devices, so sharded and unsharded runs can be compared in one process.

Set before JAX starts its backend; tests that want one device use `jax.devices()[:1]`.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)
