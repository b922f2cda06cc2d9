"""Prints the equivalence figures the tests assert bounds on, as measured numbers.

  python scripts/equivalence_report.py            # all sections (~2 min on 2 CPU cores)
  python scripts/equivalence_report.py fixtures meshes

Sections:
  fixtures  the MoE layer vs each flaxformer golden case (tests/fixtures/flaxformer_moe, plus
            $SWITCHJAX_FLAXFORMER_FIXTURES): max abs output difference, max relative metric
            difference; and vs flaxformer's gradients on them (tests/fixtures/
            flaxformer_moe_gradients), relative, in each dispatch;
  meshes    the MoE layer's outputs and gradients on 8 emulated devices vs one device, per
            router and mesh, and the all-to-all / all-gather ops of the compiled program;
  training  the tiny preset: exact resume (4 + restart + 4 vs 8 steps), 1 vs 8 devices, and two
            processes x 4 devices (jax.distributed on 127.0.0.1) vs one process x 8.
It uses the helpers the tests use (switchjax.equivalence), so it measures exactly what the tests
check.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "flaxformer_moe"  # Data, not code: nothing imports tests/.
GRADIENTS = FIXTURES.parent / "flaxformer_moe_gradients"
jax.config.update("jax_default_matmul_precision", "highest")


def fixtures():
  from switchjax import equivalence

  print("MoE layer vs flaxformer golden cases (max abs output diff, max rel metric diff):")
  for path in equivalence.golden_case_paths(FIXTURES):
    case = equivalence.load_golden_case(path)
    outputs, metrics = equivalence.run_golden_case(case)
    rel = max(
      abs(metrics[m] - case.metrics[m]) / max(abs(case.metrics[m]), 1e-12)
      for m in equivalence.METRICS
    )
    diff = np.abs(outputs - case.outputs).max()
    print(f"  {case.name:36s} outputs {diff:.1e}  metrics {rel:.1e}")
  print("Their gradients vs flaxformer's (max over arrays of max abs diff / max abs gradient):")
  for path in sorted(GRADIENTS.glob("*.npz")):
    name, cotangent, expected = equivalence.load_gradient_case(path)
    case = equivalence.load_golden_case(FIXTURES / f"{name}.npz")
    errors = []
    for dispatch in equivalence.DISPATCHES:
      ours = equivalence.golden_gradients(case, cotangent, dispatch)
      errors.append(f"{dispatch} {equivalence.worst_gradient_error(ours, expected):.1e}")
    print(f"  {name:36s} " + "  ".join(errors))


def meshes():
  from switchjax.equivalence import MESHES, mesh_test_layer, run_on_mesh

  print("MoE layer on 8 emulated devices vs one device (max abs diffs):")
  for router in ("tokens_choose_masked", "tokens_choose_scatter", "experts_choose_masked"):
    boxed, params, x, grad_fn = mesh_test_layer(router)
    ref_grads, ref_y = jax.jit(grad_fn)(params, x)
    for shape in MESHES:
      grads, y, hlo = run_on_mesh(shape, boxed, params, x, grad_fn)
      dg = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))
      )
      print(
        f"  {router:22s} {str(shape):10s} outputs "
        f"{np.abs(np.asarray(y) - np.asarray(ref_y)).max():.1e}  gradients {dg:.1e}  "
        f"all-to-all ops {hlo.count('all-to-all(')}  all-gather ops "
        f"{hlo.count('all-gather(')}"
      )


def training():
  from switchjax import checkpoint, model_loading
  from switchjax.config import load_config
  from switchjax.training import train

  tmp = pathlib.Path(tempfile.mkdtemp())
  common = ["train.log_every=1", "train.eval_every=0"]

  def run(workdir, *overrides, devices=None):
    return train(
      load_config("tiny", [*common, *overrides]),
      tmp / workdir,
      devices=devices,
      progress=False,
      log=lambda _: None,
    )

  straight = run("straight", "train.num_train_steps=8", "train.checkpoint_every=4")
  run("resumed", "train.num_train_steps=4", "train.checkpoint_every=4")
  resumed = run("resumed", "train.num_train_steps=8", "train.checkpoint_every=4")
  same_params = checkpoint.params_equal(
    model_loading.load_model(tmp / "straight")[1], model_loading.load_model(tmp / "resumed")[1]
  )
  print(
    f"Resume: losses bit-identical {resumed.losses.items() <= straight.losses.items()}, "
    f"parameters bit-identical {same_params}"
  )
  one = run("one", "mesh.data=1", "train.num_train_steps=6", devices=jax.devices()[:1])
  eight = run("eight", "mesh.data=2", "mesh.expert=4", "train.num_train_steps=6")
  print(
    f"1 vs 8 devices (2 data x 4 expert): max loss diff "
    f"{max(abs(one.losses[s] - eight.losses[s]) for s in one.losses):.1e}"
  )
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  args = [
    "--no_progress",
    "--config=tiny",
    f"--workdir={tmp / 'multi'}",
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
  ]
  for item in ("mesh.data=2", "mesh.expert=4", "train.num_train_steps=6", *common):
    args += ["--set", item]
  procs = [
    subprocess.Popen(
      [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args, f"--process_id={i}"],
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    for i in range(2)
  ]
  if any(p.wait() for p in procs):
    print("2 processes: the run failed (see scripts/pretrain.py with the same flags)")
    return
  lines = (tmp / "multi" / "metrics.jsonl").read_text().splitlines()
  multi = {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
  print(
    f"2 processes x 4 devices vs 1 process x 8: max loss diff "
    f"{max(abs(multi[s] - eight.losses[s]) for s in eight.losses):.1e}"
  )


if __name__ == "__main__":
  sections = {"fixtures": fixtures, "meshes": meshes, "training": training}
  for name in sys.argv[1:] or sections:
    if name not in sections:
      sys.exit(f"error: unknown section {name!r}; choose from {', '.join(sections)}")
    try:
      sections[name]()
    except ValueError as e:
      sys.exit(f"error: {e}")
