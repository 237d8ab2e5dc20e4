"""Flax NNX networks and their functional form ``model_fn(params, x, t, condition=None)``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dpmjax
from dpmjax.nets import MLP, UNet, as_model_fn, build_model, sinusoidal_embedding


def _randomise(params, seed=0, scale=0.3):
    """Add N(0, scale^2) noise to every parameter (the output layers start at zero)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


@pytest.fixture(scope="module")
def mlp():
    graphdef, params = nnx.split(MLP(2, width=16, depth=2, temb_dim=8, rngs=nnx.Rngs(0)))
    return graphdef, _randomise(params), jax.jit(as_model_fn(graphdef))


@pytest.fixture(scope="module")
def unet():
    graphdef, params = nnx.split(UNet(1, channels=4, num_classes=10, temb_dim=8, rngs=nnx.Rngs(0)))
    return graphdef, _randomise(params), jax.jit(as_model_fn(graphdef))


def test_sinusoidal_embedding_formula():
    t = jnp.array([0.0, 0.5, 2.0])
    emb = sinusoidal_embedding(t, 6, time_scale=10.0, max_period=100.0)
    freqs = 100.0 ** (-np.arange(3) / 3)
    s = np.array([0.0, 5.0, 20.0])[:, None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.sin(s), np.cos(s)], -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(t, 5)


def test_functional_form_matches_module_and_jits(mlp):
    graphdef, params, model_fn = mlp
    module = nnx.merge(graphdef, params)
    x = jax.random.normal(jax.random.key(1), (5, 2))
    t = jnp.linspace(0.01, 1.0, 5)
    out = model_fn(params, x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(out, module(x, t), rtol=1e-5, atol=1e-6)
    # the time input matters, and so do the parameters
    assert float(jnp.max(jnp.abs(model_fn(params, x, t[::-1]) - out))) > 1e-3
    grads = jax.grad(lambda p: jnp.sum(model_fn(p, x, t) ** 2))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) == len(norms)


def test_fresh_mlp_predicts_zero_noise():
    # zero-initialised output layer: the initial loss is E|eps|^2 = 1 whatever the schedule
    graphdef, params = nnx.split(build_model({"kind": "mlp", "width": 8, "depth": 1, "temb_dim": 8}))
    out = as_model_fn(graphdef)(params, jnp.ones((3, 2)), jnp.ones((3,)))
    np.testing.assert_array_equal(out, 0.0)


def test_mlp_extrapolates_linearly_in_x(mlp):
    # no normalisation layers: far from the data the output keeps growing with |x|
    # (an MLP with LayerNorm saturates, which sends the tails of x_T ~ N(0, I) astray)
    _, params, model_fn = mlp
    d = jnp.array([[0.6, 0.8]])
    t = jnp.ones((1,))
    small, big = (float(jnp.linalg.norm(model_fn(params, r * d, t) - model_fn(params, 0 * d, t)))
                  for r in (10.0, 100.0))
    assert big > 5.0 * small


@pytest.mark.slow
def test_unet_class_embedding_and_null_class(unet):
    _, params, model_fn = unet
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    t = jnp.full((4,), 0.5)
    out = model_fn(params, x, t, jnp.array([0, 1, 2, 3]))
    assert out.shape == x.shape
    other = model_fn(params, x, t, jnp.array([4, 5, 6, 7]))
    assert float(jnp.min(jnp.max(jnp.abs(out - other), axis=(1, 2, 3)))) > 1e-4  # labels matter per sample
    # condition=None is the null class (index num_classes) used for classifier-free guidance
    np.testing.assert_allclose(model_fn(params, x, t), model_fn(params, x, t, jnp.full((4,), 10)), atol=1e-6)


def test_unconditional_networks_reject_a_condition():
    with pytest.raises(ValueError, match="condition"):
        build_model({"kind": "unet", "channels": 4, "temb_dim": 8})(jnp.zeros((1, 8, 8, 1)), jnp.ones(1),
                                                                    jnp.zeros(1, int))
    with pytest.raises(ValueError, match="condition"):
        build_model({"kind": "mlp", "width": 8})(jnp.zeros((1, 2)), jnp.ones(1), jnp.zeros(1, int))


def test_build_model_errors():
    with pytest.raises(ValueError, match="kind"):
        build_model({"kind": "transformer"})
    with pytest.raises(ValueError, match="bad mlp model spec"):
        build_model({"kind": "mlp", "colour": "red"})


@pytest.mark.slow
def test_sample_with_classifier_free_guidance(unet):
    # the trained-model path of `dpmjax sample`: condition, null condition and a traced guidance scale
    graphdef, params, _ = unet
    model_fn = as_model_fn(graphdef)
    null = jnp.full((4,), 10)
    key = jax.random.key(3)

    def sample(labels, scale):
        return dpmjax.sample(model_fn, params, key, (4, 8, 8, 1), schedule=dpmjax.VPLinear(), steps=3, order=2,
                             skip_type="logSNR", condition=labels, unconditional_condition=null,
                             guidance_scale=scale)

    labels, other = jnp.array([0, 1, 2, 3]), jnp.array([4, 5, 6, 7])
    s3 = sample(labels, 3.0)
    assert s3.shape == (4, 8, 8, 1) and bool(jnp.all(jnp.isfinite(s3)))
    assert float(jnp.min(jnp.max(jnp.abs(s3 - sample(other, 3.0)), axis=(1, 2, 3)))) > 1e-4  # labels matter
    # scale 0 is the unconditional (null-class) model: the labels no longer matter
    np.testing.assert_allclose(sample(labels, 0.0), sample(other, 0.0), atol=1e-6)


def test_numpy_float64_input_is_read_in_jax_dtype_without_a_warning(mlp, unet):
    """Called eagerly on float64 NumPy arrays (as a loop written in NumPy does) without
    jax_enable_x64, the networks compute in float32 and warn about no truncation."""
    import warnings

    rng = np.random.default_rng(0)
    for (graphdef, params, _), shape, cond in ((mlp, (3, 2), None), (unet, (3, 8, 8, 1), jnp.arange(3))):
        fn = as_model_fn(graphdef)
        x = rng.standard_normal(shape)  # float64
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = fn(params, x, np.full(3, 0.5), cond)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(out, fn(params, jnp.asarray(x, jnp.float32), np.full(3, 0.5), cond))
