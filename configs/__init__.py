"""The published root config.json of Flash, Pro and their Base variants, and tiny test configs
(installed as package data of `v4jax.configs`, so `v4jax plan` finds them outside a checkout)."""
