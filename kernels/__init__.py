"""Pallas GPU kernels for qjax, installed as `qjax.kernels`."""
