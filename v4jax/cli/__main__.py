"""`python -m v4jax.cli ...` is `v4jax ...`."""

from v4jax.cli import main

main()
