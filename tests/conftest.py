import os
import sys

# Eight simulated CPU devices for the sharding tests; set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))  # tests import the numpy oracle as `oracle`
