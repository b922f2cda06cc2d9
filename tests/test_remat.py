"""Remat (`model.remat='full'`) makes the layers' Python flags static by parameter name, never by
a hard-coded position that a new parameter would shift onto another argument."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchjax.model import REMAT_STATIC_ARGS, remat_static_argnums


def _positional(cls) -> list[inspect.Parameter]:
  params = inspect.signature(cls.__call__).parameters.values()
  return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("cls", list(REMAT_STATIC_ARGS), ids=lambda cls: cls.__name__)
def test_static_remat_arguments_are_the_layers_flags(cls):
  names = REMAT_STATIC_ARGS[cls]
  params = _positional(cls)
  assert params[0].name == "self"  # nn.remat counts self as argument 0
  assert [params[i].name for i in remat_static_argnums(cls, names)] == list(names)
  # Every Python flag of the layer's __call__ is static under remat (jax.checkpoint would trace
  # a flag left out), and nothing else is (arrays cannot be static).
  flags = [p.name for p in params if p.annotation in ("bool", bool)]
  assert sorted(flags) == sorted(names)


def test_a_static_name_missing_from_the_signature_is_an_error():
  cls = next(iter(REMAT_STATIC_ARGS))
  with pytest.raises(ValueError, match=r"no positional parameters \['deterministic'\]"):
    remat_static_argnums(cls, ("deterministic",))


class _Layer(nn.Module):
  """A layer that gained a parameter (`scale`) in front of its flag."""

  @nn.compact
  def __call__(self, x, scale, enable_dropout: bool = False):
    y = nn.Dense(3)(x) * scale
    return nn.Dropout(0.5)(y, deterministic=not enable_dropout)


@pytest.mark.parametrize("enable_dropout", [False, True])
def test_static_argnums_follow_a_parameter_added_in_front_of_the_flag(enable_dropout):
  argnums = remat_static_argnums(_Layer, ("enable_dropout",))
  assert argnums == (3,)  # was (2,) before `scale` came in
  x = jnp.ones((2, 4))
  params = _Layer().init(jax.random.key(0), x, 1.0)
  scale = jnp.float32(2.0)  # an array: it must stay traced

  def loss(params, cls):
    y = cls().apply(params, x, scale, enable_dropout, rngs={"dropout": jax.random.key(1)})
    return jnp.sum(y**2)

  grads = jax.grad(loss)(params, nn.remat(_Layer, static_argnums=argnums))
  expected = jax.grad(loss)(params, _Layer)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
