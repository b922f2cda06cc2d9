"""T5X's MoE Adafactor (`switchjax.optimizers.t5x_adafactor`) against a NumPy transcription of
T5X's update rule, per-expert independence, the factoring of every parameter of a model, the
sharding of the state on a mesh, and the errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from switchjax import checkpoint, sharding
from switchjax.config import MeshConfig, TrainConfig, load_config
from switchjax.model import SwitchTransformer, init_params
from switchjax.optimizers import (
  factor_plan,
  factor_plans,
  learning_rate_schedule,
  make_optimizer,
  opt_state_specs,
  t5x_adafactor,
)

E, D, F, H, K = 4, 128, 192, 4, 48  # experts, d_model, expert d_ff, heads, d_kv (H * K = 192)

# --------------------------------------------------------------------------------------------
# T5X's Adafactor in NumPy, transcribed from t5x/adafactor.py (Adafactor._parse_rule,
# _factored_dims, _decay_rate_pow, apply_param_gradient) with the MoE recipe's settings:
# decay_rate 0.8, step_offset 0, epsilon1 1e-30, epsilon2 1e-3, clipping_threshold 1.0,
# multiply_by_parameter_scale, min_dim_size_to_factor 128; no momentum (beta1) unless given.
# Parameters are in flaxformer's layout (attention kernels are [d_model, heads * d_kv]
# matrices) with the rule T5X's set_param_axes derives from the MoE logical factor rules.


def t5x_parse_rule(shape, rule):
  """(averaging_dims, (row_dims, col_dims) or None). A matrix or vector without batch axes
  falls back to the heuristic: factor the two largest dims if the smaller is >= 128."""
  ndim = len(shape)
  batched = tuple(i for i, r in enumerate(rule) if r == "batch")
  if ndim <= 2 and not batched:
    if ndim < 2:
      return tuple(range(ndim)), None
    sorted_dims = np.argsort(shape)
    if shape[sorted_dims[-2]] < 128:
      return tuple(range(ndim)), None
    return tuple(range(ndim)), ((int(sorted_dims[-2]),), (int(sorted_dims[-1]),))
  averaging = tuple(np.delete(np.arange(ndim), batched))
  rows = tuple(i for i, r in enumerate(rule) if r == "row")
  cols = tuple(i for i, r in enumerate(rule) if r == "col")
  return averaging, (rows, cols)


def t5x_init(shape, rule, beta1):
  _, factored = t5x_parse_rule(shape, rule)
  state = {"m": np.zeros(shape)} if beta1 is not None else {}
  if factored is None:
    return {**state, "v": np.zeros(shape)}
  d1, d0 = factored
  return {**state, "v_row": np.zeros(np.delete(shape, d0)), "v_col": np.zeros(np.delete(shape, d1))}


def t5x_apply_param_gradient(step, learning_rate, param, state, grad, rule, beta1):
  """One step of one parameter: (new_param, new_state, clipping_denominator)."""
  averaging_dims, factored_dims = t5x_parse_rule(param.shape, rule)
  decay_rate = 1.0 - (step + 1.0) ** -0.8  # _decay_rate_pow(step - step_offset, 0.8)
  param_scale = np.sqrt(np.mean(param * param, axis=averaging_dims, keepdims=True))
  update_scale = learning_rate * np.maximum(param_scale, 1e-3)  # epsilon2
  mixing_rate = 1.0 - decay_rate
  grad_sqr = grad * grad + 1e-30  # epsilon1
  new_state = {}
  if factored_dims is not None:
    d1, d0 = factored_dims
    new_v_row = decay_rate * state["v_row"] + mixing_rate * np.mean(grad_sqr, axis=d0)
    new_v_col = decay_rate * state["v_col"] + mixing_rate * np.mean(grad_sqr, axis=d1)
    new_state = {"v_row": new_v_row, "v_col": new_v_col}
    reduced_d1 = tuple(d - len([e for e in d0 if e < d]) for d in d1)
    row_col_mean = np.mean(new_v_row, axis=reduced_d1, keepdims=True)
    row_factor = (new_v_row / row_col_mean) ** -0.5
    col_factor = new_v_col**-0.5
    y = grad * np.expand_dims(row_factor, axis=d0) * np.expand_dims(col_factor, axis=d1)
  else:
    new_v = decay_rate * state["v"] + mixing_rate * grad_sqr
    new_state = {"v": new_v}
    y = grad * new_v**-0.5
  clipping_denom = np.maximum(1.0, np.sqrt(np.mean(y * y, axis=averaging_dims, keepdims=True)))
  y = y / clipping_denom
  subtrahend = update_scale * y
  if beta1 is not None:
    new_state["m"] = beta1 * state["m"] + (1.0 - beta1) * subtrahend
    subtrahend = new_state["m"]
  return param - subtrahend, new_state, float(np.max(clipping_denom))


# --------------------------------------------------------------------------------------------
# A parameter tree: ours (3-D attention kernels) and flaxformer's (2-D), with its axes/rules.

OURS = {  # name: (shape, logical axes)
  "expert_wi": ((E, D, F), ("expert", "embed", "expert_mlp")),
  "expert_wo": ((E, F, D), ("expert", "expert_mlp", "embed")),
  "query": ((D, H, K), ("embed", "heads", "kv")),
  "out": ((H, K, D), ("heads", "kv", "embed")),
  "scale": ((D,), ("embed",)),
  "relpos": ((H, 32), ("heads", "relpos_buckets")),
  "router": ((D, 8), ("embed", "unmodeled")),
}
FLAXFORMER = {  # name: (shape, T5X factor rule from the MoE logical factor rules)
  "expert_wi": ((E, D, F), ("batch", "row", "col")),
  "expert_wo": ((E, F, D), ("batch", "col", "row")),
  "query": ((D, H * K), ("row", "col")),  # ('embed', 'joined_kv')
  "out": ((H * K, D), ("col", "row")),  # ('joined_kv', 'embed')
  "scale": ((D,), ("none",)),
  "relpos": ((H, 32), ("none", "none")),  # (COLUMN, NONE): partial rules become NONE
  "router": ((D, 8), ("none", "none")),
}
AXES = {k: P(*axes) for k, (_, axes) in OURS.items()}


def random_tree(seed, scales):
  rng = np.random.default_rng(seed)
  tree = {k: rng.normal(size=shape) * scales.get(k, 1.0) for k, (shape, _) in OURS.items()}
  # Experts on different scales, so per-expert statistics and clipping matter.
  for k in ("expert_wi", "expert_wo"):
    tree[k] = tree[k] * np.array([1.0, 30.0, 0.01, 3.0])[:, None, None]
  return tree


def to_flaxformer(tree):
  return {k: np.reshape(v, FLAXFORMER[k][0]) for k, v in tree.items()}


PARAM_SCALES = {"relpos": 1e-4, "scale": 0.0}  # the epsilon2 floor of the parameter scale
GRAD_SCALES = {"query": 1e-3, "router": 1e3}


def relative_difference(ours, ref, elementwise):
  """max |ours - ref| / |ref| elementwise; with momentum (whose sums can cancel to ~0) relative
  to the largest |ref| of each expert (3-D kernels) or of the parameter."""
  if elementwise:
    return np.max(np.abs(ours - ref) / np.abs(ref))
  ours, ref = (np.reshape(x, (ref.shape[0] if ref.ndim == 3 else 1, -1)) for x in (ours, ref))
  return np.max(np.max(np.abs(ours - ref), axis=1) / np.max(np.abs(ref), axis=1))


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_matches_numpy_transcription_of_t5x_over_steps(beta1):
  steps, cfg = 5, TrainConfig(learning_rate=1.0, warmup_steps=2)  # lr 1/sqrt(max(step, 2))
  tx = t5x_adafactor(learning_rate_schedule(cfg), AXES, beta1=beta1)
  update = jax.jit(tx.update)
  params = jax.tree.map(jnp.float32, random_tree(0, PARAM_SCALES))
  state = tx.init(params)
  ref_params = to_flaxformer(random_tree(0, PARAM_SCALES))  # float64
  ref_state = {k: t5x_init(*FLAXFORMER[k], beta1) for k in ref_params}
  worst, clipped = 0.0, set()
  for step in range(steps):
    grads = random_tree(100 + step, GRAD_SCALES)
    updates, state = update(jax.tree.map(jnp.float32, grads), state, params)
    params = optax.apply_updates(params, updates)
    lr = 1.0 / np.sqrt(max(step, 2))
    for name, (_, rule) in FLAXFORMER.items():
      new, ref_state[name], denom = t5x_apply_param_gradient(
        step, lr, ref_params[name], ref_state[name], to_flaxformer(grads)[name], rule, beta1
      )
      ref_update, ref_params[name] = new - ref_params[name], new
      ours = np.reshape(np.asarray(updates[name], np.float64), ref_update.shape)
      relative = relative_difference(ours, ref_update, elementwise=beta1 is None)
      assert relative < 1e-6, (step, name, relative)
      worst = max(worst, relative)
      if denom > 1.0:
        clipped.add(name)
      for slot, ref in ref_state[name].items():  # statistics, in our layout
        ours = np.asarray(getattr(state, slot)[name], np.float64).reshape(ref.shape)
        relative = relative_difference(ours, ref, elementwise=slot != "m")
        assert relative < 1e-6, (step, name, slot, relative)
  assert int(state.count) == steps
  assert clipped, "update clipping never triggered: the test would not cover it"
  print(f"beta1={beta1}: max relative difference of the updates {worst:.2e}, clipped {clipped}")


def test_plans_are_t5x_rules_on_the_flaxformer_layout():
  plan = lambda name: factor_plan(*OURS[name])
  assert plan("expert_wi").averaging_dims == (1, 2)  # per expert
  assert (plan("expert_wi").row_dims, plan("expert_wi").col_dims) == ((1,), (2,))
  assert (plan("expert_wo").row_dims, plan("expert_wo").col_dims) == ((2,), (1,))
  assert (plan("query").row_dims, plan("query").col_dims) == ((0,), (1, 2))  # [d, heads*kv]
  assert (plan("out").row_dims, plan("out").col_dims) == ((2,), (0, 1))  # 128 < 192
  for name in ("scale", "relpos", "router"):
    assert not plan(name).factored and plan(name).averaging_dims == tuple(range(len(OURS[name][0])))
  # Expert kernels are factored whatever their size (an explicit rule); small matrices are not.
  small_experts = factor_plan((4, 32, 64), ("expert", "embed", "expert_mlp"))
  assert small_experts.row_dims == (1,) and small_experts.col_dims == (2,)
  assert not factor_plan((32, 2, 16), ("embed", "heads", "kv")).factored
  # Without factoring (factored=False) T5X has no rule: even the expert axis is averaged over.
  unfactored = factor_plan((4, 128, 128), OURS["expert_wi"][1], factored=False)
  assert unfactored.averaging_dims == (0, 1, 2) and not unfactored.factored


def test_each_expert_is_updated_independently():
  """Changing expert 1's gradient and parameters leaves the other experts' updates unchanged
  (their own statistics, parameter RMS and clipping); under optax.adafactor they change."""
  params = {"w": jnp.asarray(random_tree(0, {})["expert_wi"], jnp.float32)}
  grads = {"w": jnp.asarray(random_tree(1, {})["expert_wi"], jnp.float32)}
  other_params = {"w": params["w"].at[1].multiply(10.0)}
  other_grads = {"w": grads["w"].at[1].set(grads["w"][2] * 1e4)}

  def first_update(tx, params, grads):
    return tx.update(grads, tx.init(params), params)[0]["w"]

  ours = t5x_adafactor(0.01, {"w": AXES["expert_wi"]})
  before, after = first_update(ours, params, grads), first_update(ours, other_params, other_grads)
  for expert in (0, 2, 3):
    np.testing.assert_allclose(after[expert], before[expert], rtol=1e-6)
  assert not np.allclose(after[1], before[1], rtol=1e-2)
  optax_tx = optax.adafactor(0.01, decay_rate=0.8, multiply_by_parameter_scale=True)
  optax_before = first_update(optax_tx, params, grads)
  optax_after = first_update(optax_tx, other_params, other_grads)
  assert not np.allclose(optax_after[0], optax_before[0], rtol=1e-2)


def test_every_parameter_of_the_small_model_is_factored_as_t5x_would():
  config = load_config("small")
  boxed = jax.eval_shape(
    functools.partial(init_params, SwitchTransformer(config.model)), jax.random.key(0)
  )
  axes = nn.get_partition_spec(boxed)
  plans = factor_plans(sharding.unbox(boxed), axes)
  with_experts = {
    jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(axes) if "expert" in a
  }
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(plans)}
  factored = {k for k, v in flat.items() if v.factored}
  by_expert = {k for k, v in flat.items() if v.averaging_dims == (1, 2)}
  # d_model 128, 4 heads x 32, d_ff 512, vocab 2176, 8 experts.
  for name, plan in flat.items():
    if name.endswith(("['query']", "['key']", "['value']")):
      assert (plan.row_dims, plan.col_dims) == ((0,), (1, 2)), name
    elif name.endswith("['out']"):  # [128, 128] after joining: a tie, the first is the row
      assert (plan.row_dims, plan.col_dims) == ((0, 1), (2,)), name
  assert "['token_embedder']['embedding']" in factored  # [vocab, embed]: row embed, col vocab
  assert flat["['token_embedder']['embedding']"].row_dims == (1,)
  assert len(by_expert) == 8 and by_expert == with_experts and by_expert <= factored
  assert all(not flat[k].factored for k in flat if k.endswith(("['scale']", "['rel_embedding']")))
  assert all(not v.factored for k, v in flat.items() if "router" in k)  # [128, 8]


def test_state_is_sharded_by_the_logical_axes_on_a_mesh():
  """Specs follow the parameters' axes (factored statistics without the averaged axis, the
  expert axis kept), and one update on a 2 x 2 x 2 mesh equals the single-device update."""
  cfg = TrainConfig(learning_rate=1.0, warmup_steps=2)
  params = jax.tree.map(jnp.float32, random_tree(0, PARAM_SCALES))
  grads = jax.tree.map(jnp.float32, random_tree(1, GRAD_SCALES))
  specs = opt_state_specs(cfg, params, AXES)
  assert specs.count == P()
  assert specs.v_row["expert_wi"] == P("expert", None)  # [E, d_model]
  assert specs.v_col["expert_wi"] == P("expert", "model")  # [E, d_ff]
  assert specs.v_row["expert_wo"] == P("expert", None)  # [E, d_model]
  assert specs.v_col["expert_wo"] == P("expert", "model")
  assert specs.v_row["query"] == P(None) and specs.v_col["query"] == P("model", None)
  assert specs.v["relpos"] == P("model", None) and specs.v["scale"] == P(None)
  assert specs.v["expert_wi"] == P() and specs.v_row["scale"] == P()  # placeholders
  assert jax.tree.structure(specs) == jax.tree.structure(make_optimizer(cfg, AXES).init(params))

  tx = make_optimizer(cfg, AXES)
  expected_updates, expected_state = jax.jit(tx.update)(grads, tx.init(params), params)
  mesh = sharding.make_mesh(MeshConfig(data=2, expert=2, model=2), num_experts=4)
  named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree)
  param_shardings = named(nn.logical_to_mesh(AXES, sharding.LOGICAL_AXIS_RULES))
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init, out_shardings=named(specs))(jax.device_put(params, param_shardings))
    update = jax.jit(
      tx.update,
      in_shardings=(param_shardings, named(specs), param_shardings),
      out_shardings=(param_shardings, named(specs)),
    )
    updates, state = update(grads, state, params)
  assert state.v_col["expert_wi"].sharding.spec == P("expert", "model")
  assert state.v_col["expert_wi"].addressable_shards[0].data.shape == (2, 96)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
    (updates, state),
    (expected_updates, expected_state),
  )


def test_unknown_axis_name_is_a_clear_error():
  tx = t5x_adafactor(0.01, {"w": P("embed", "mystery")})
  with pytest.raises(
    ValueError,
    match=r"no factor rule for logical axis 'mystery' of parameter \['w'\] "
    r"\(axes \('embed', 'mystery'\)\)\. Known axis names: .*expert.*MOE_FACTOR_RULES",
  ):
    tx.init({"w": jnp.zeros((4, 4))})
  with pytest.raises(ValueError, match="t5x_adafactor needs the parameters"):
    tx.update({"w": jnp.zeros((4, 4))}, None)


def test_checkpoint_with_optax_adafactor_state_is_refused(tmp_path):
  """Runs saved with the former optax.adafactor state get the incompatible-checkpoint error
  (no traceback in pretrain.py, which reports ValueErrors), not a failed restore."""
  params = {"w": jnp.ones((4, 128, 256)), "b": jnp.ones((128,))}
  axes = {"w": P("expert", "embed", "expert_mlp"), "b": P("embed")}
  store = checkpoint.CheckpointStore(tmp_path, async_save=False)
  store.save(2, params, optax.adafactor(0.01).init(params), {"data": {}})
  new_state = jax.eval_shape(make_optimizer(TrainConfig(), axes).init, params)
  with pytest.raises(
    checkpoint.IncompatibleCheckpointError,
    match=r"holds checkpoints of another model or optimizer \(step 2, opt_state: arrays this",
  ):
    store.restore_latest(jax.eval_shape(lambda: params), new_state, report=lambda _: None)
  assert store.steps() == [2]  # kept, not set aside as broken
  store.close()
