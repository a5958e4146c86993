"""kdcl_dist: distributed knowledge distillation with curriculum learning and selective reliance."""

__version__ = "0.1.0"
FORMAT_VERSION = 1
