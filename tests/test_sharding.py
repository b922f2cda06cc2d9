"""Expert parallelism: the MoE layer on 8 emulated devices equals the single-device layer."""

import jax
import numpy as np
import pytest

from switchjax import sharding
from switchjax.config import MeshConfig
from switchjax.equivalence import MESHES, mesh_test_layer, run_on_mesh


@pytest.mark.parametrize("dispatch", ["einsum", "buffers", "sorted"])
@pytest.mark.parametrize(
  "router_type", ["tokens_choose_masked", "tokens_choose_scatter", "experts_choose_masked"]
)
@pytest.mark.slow
def test_meshes_match_single_device(router_type, dispatch):
  boxed, params, x, grad_fn = mesh_test_layer(router_type, dispatch)
  ref_grads, ref_y = jax.jit(grad_fn)(params, x)
  for shape in MESHES:
    grads, y, hlo = run_on_mesh(shape, boxed, params, x, grad_fn)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-5, err_msg=str(shape))
    for (path, g), g_ref in zip(
      jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)
    ):
      np.testing.assert_allclose(
        np.asarray(g), np.asarray(g_ref), atol=1e-5, err_msg=f"{shape} {jax.tree_util.keystr(path)}"
      )
    # Expert weights really are split over the expert axis.
    assert grads["wo"].sharding.spec[0] == "expert"
    if shape == (2, 4, 1):
      # Expert parallelism happens: tokens travel to their experts by all-to-all, and no
      # device gathers the whole batch's routing state.
      assert "all-to-all(" in hlo
      assert "all-gather(" not in hlo


def test_param_specs_follow_the_rules():
  boxed, *_ = mesh_test_layer("tokens_choose_masked")
  specs = sharding.param_specs(boxed)
  assert specs["wi_0"] == jax.sharding.PartitionSpec("expert", None, "model")
  assert specs["wo"] == jax.sharding.PartitionSpec("expert", "model", None)
  assert specs["router"]["kernel"] == jax.sharding.PartitionSpec(None, None)
  assert sharding.logical_to_spec(("batch", "length")) == jax.sharding.PartitionSpec(
    ("data", "expert"), None
  )


def test_mesh_sizes_resolve_and_are_checked():
  assert sharding.resolve_mesh_shape(MeshConfig(-1, 4, 1), 8) == (2, 4, 1)
  assert sharding.resolve_mesh_shape(MeshConfig(2, -1, 2), 8) == (2, 2, 2)
  mesh = sharding.make_mesh(MeshConfig(2, 4, 1), num_experts=8)
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(
    ValueError,
    match=r"mesh data x expert x model = 2 x 2 x 1 = 4 devices, "
    r"but 8 are available",
  ):
    sharding.make_mesh(MeshConfig(2, 2, 1))
  with pytest.raises(
    ValueError,
    match=r"mesh.data=-1, mesh.expert=3, mesh.model=1 do not fit 8 "
    r"devices: the fixed sizes multiply to 3, which does not "
    r"divide 8",
  ):
    sharding.make_mesh(MeshConfig(-1, 3, 1))
  with pytest.raises(ValueError, match=r"at most one of mesh.data, mesh.expert, mesh.model"):
    sharding.make_mesh(MeshConfig(-1, -1, 1))
  with pytest.raises(
    ValueError,
    match=r"mesh.expert=8 does not divide moe.num_experts=12; "
    r"choose an expert axis size that divides 12",
  ):
    sharding.make_mesh(MeshConfig(1, 8, 1), num_experts=12)
