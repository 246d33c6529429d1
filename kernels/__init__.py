"""Pallas GPU kernels for qjax, installed as `qjax.kernels`.

One module per kernel, each with its tuning config, kernel body, validating wrapper and the jnp
`reference` beside it (imported on use; Pallas imports are not needed on the CPU path):
  qmatmul_decode  split-K GEMV for M <= 16 (Triton backend)
  qmatmul_triton  tiled GEMM, the portable / Ampere path (Triton backend)
  qmatmul_mosaic  Hopper TMA + wgmma GEMM (Mosaic GPU backend)
  dispatch        which kernel `qjax.qmatmul(backend="pallas")` runs
"""
