"""Old import path of :func:`load_timm_state_dict` (now :mod:`cga_jax.loading`), kept only for
``bench/tasks_jax.py``; delete once that imports from ``cga_jax.loading``."""

from cga_jax.loading import load_timm_state_dict

__all__ = ["load_timm_state_dict"]
