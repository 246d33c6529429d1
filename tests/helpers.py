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


def linen_train(loss_fn, params, steps, tx=None):
    """`steps` jitted adapters-only steps of loss_fn(params) (Linen params holding QuantizedArrays).

    tx: optax transformation (default adam(1e-2)), wrapped in `qjax.optim.adapters_only`.
    Returns (trained params, per-step losses).
    """
    import optax

    from qjax.optim import adapters_only

    tx = adapters_only(tx if tx is not None else optax.adam(1e-2))

    @jax.jit
    def step(params, opt_state):
        loss, g = jax.value_and_grad(loss_fn, allow_int=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return params, losses


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
