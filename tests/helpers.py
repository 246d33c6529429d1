"""Test data helpers shared by the test modules (import as `from helpers import ...`)."""

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def random_weights(rng, shape, dtype="float32", dist="normal"):
    """Gaussian or heavy-tailed (Student t, 2 dof) weights, exactly representable in dtype."""
    if dist == "normal":
        x = rng.standard_normal(shape)
    else:
        x = rng.standard_t(2.0, size=shape)
    x = (x * 0.05).astype(np.float32)
    return np.array(jax.numpy.asarray(x, DTYPES[dtype]))


def nnx_train_mse(model, x, y, steps, tx=None):
    """Trains an NNX model's LoRAParam adapters on mean((model(x) - y)^2) under nnx.jit.

    tx: optax transformation (default adam(1e-2)). Returns (per-step losses, the nnx.Optimizer).
    """
    import optax
    from flax import nnx

    from qjax.nnx import LoRAParam

    opt = nnx.Optimizer(model, tx if tx is not None else optax.adam(1e-2), wrt=LoRAParam)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                         argnums=nnx.DiffState(0, LoRAParam))(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt, x, y)) for _ in range(steps)], opt
