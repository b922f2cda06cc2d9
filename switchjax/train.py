"""Pretraining: train state, sharded train and eval steps, and the training loop.

The loop (`train`) builds the mesh, the data pipeline and the model, restores the newest
complete checkpoint of the workdir (parameters, optimizer state and the data position) or
initialises from scratch (or from `train.init_from`), then runs jit-compiled steps whose
inputs and outputs are sharded by the logical-axis rules. It saves asynchronously every
`checkpoint_every` steps, at the end, and on SIGTERM / Ctrl-C; a non-finite loss stops the run
without saving the broken state. The optimizer, its schedule and the sharding of its state come
from `switchjax.optimizers` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import signal
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from switchjax import checkpoint, losses, sharding
from switchjax.config import Config, TrainConfig, format_config, save_config
from switchjax.metrics_writer import MetricsWriter
from switchjax.model import (
  SwitchTransformer,
  decoder_sparse_layers,
  encoder_sparse_layers,
  init_params,
)
from switchjax.optimizers import learning_rate_schedule, make_optimizer, opt_state_specs

Array = jax.Array


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# FLOPs (for the MFU estimate).

PEAK_TFLOPS = {  # dense bfloat16 peak per device
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,
  "TPU v5e": 197.0,
  "TPU v5p": 459.0,
  "TPU v6 lite": 918.0,
  "TPU v6e": 918.0,
  "NVIDIA A100": 312.0,
  "NVIDIA H100": 989.0,
  "NVIDIA H200": 989.0,
}


def peak_tflops(device: jax.Device, configured: float) -> float | None:
  """Per-device peak TFLOP/s: the configured value, else a known device kind, else None."""
  if configured > 0:
    return configured
  return next((v for k, v in PEAK_TFLOPS.items() if device.device_kind.startswith(k)), None)


def train_flops_per_example(config: Config) -> float:
  """Approximate training FLOPs (forward + backward = 3 x forward) of one example.

  Counts the matmuls: 2 FLOPs per multiply-add of every dense weight a token passes through,
  each MoE token through k experts (capacity slack not counted), attention's QK^T and AV, and
  the output logits.
  """
  m, d = config.model, config.data
  s, t = d.inputs_length, d.targets_length
  attn_proj = 4 * m.d_model * m.num_heads * m.d_kv
  mlp = (len(m.mlp_activations) + 1) * m.d_model * m.d_ff

  def expert(moe):  # MACs of one token through the router and its experts
    k = moe.router().experts_per_token(moe, train=True)
    return k * (len(m.expert_acts) + 1) * m.d_model * m.expert_mlp_dim + m.d_model * moe.num_experts

  def stack(name, num_layers, sparse, length, cross):
    sparse_mlp = expert(m.moe_for(name))
    per_layer = [
      (attn_proj * (2 if cross else 1)) + (sparse_mlp if i in sparse else mlp)
      for i in range(num_layers)
    ]
    attention = num_layers * 2 * m.num_heads * m.d_kv * (length + (s if cross else 0))
    return length * (sum(per_layer) + attention)

  forward_macs = (
    stack("encoder", m.num_layers, set(encoder_sparse_layers(m)), s, False)
    + stack("decoder", m.decoder_layers, set(decoder_sparse_layers(m)), t, True)
    + t * m.d_model * m.vocab_size
  )
  return 3 * 2 * forward_macs


# --------------------------------------------------------------------------------------------
# Steps.


def _split_microbatches(batch: dict[str, Array], n: int) -> dict[str, Array]:
  """[batch, ...] -> [n, batch / n, ...]."""
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def make_train_step(
  model: SwitchTransformer, tx: optax.GradientTransformation, cfg: TrainConfig
) -> Callable:
  """train_step(state, batch) -> (state, metrics), with state = {step, params, opt_state,
  nonfinite}. The dropout/jitter key of step s is fold_in(key(seed), s); with microbatches the
  gradients are summed over losses normalised by the whole batch's target tokens, so the
  update equals the full-batch one (up to MoE routing groups being per microbatch)."""
  base_key = jax.random.key(cfg.seed)
  schedule = learning_rate_schedule(cfg)

  def microbatch_loss(params, mb, num_tokens, key):
    logits, state = model.apply(
      {"params": params},
      mb["encoder_input_tokens"],
      mb["decoder_input_tokens"],
      mb["decoder_target_tokens"],
      enable_dropout=True,
      mutable=["intermediates"],
      rngs={"dropout": jax.random.fold_in(key, 0), "jitter": jax.random.fold_in(key, 1)},
    )
    weights = mb["decoder_loss_weights"]
    total, total_z, tokens = losses.cross_entropy_with_z_loss(
      logits, mb["decoder_target_tokens"], weights, cfg.z_loss, cfg.label_smoothing
    )
    moe_loss, moe_metrics = losses.moe_losses_and_metrics(
      state["intermediates"], cfg.aux_loss_factor, cfg.router_z_loss_factor
    )
    loss = total / num_tokens + moe_loss / cfg.num_microbatches
    correct = jnp.sum((jnp.argmax(logits, -1) == mb["decoder_target_tokens"]) * weights)
    sums = {
      "ce_sum": total - total_z,
      "z_sum": total_z,
      "correct": correct,
      "moe_loss": moe_loss,
      **moe_metrics,
    }
    return loss, sums

  grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(base_key, step)
    num_tokens = jnp.maximum(jnp.sum(batch["decoder_loss_weights"]), 1.0)
    if cfg.num_microbatches == 1:
      (loss, sums), grads = grad_fn(state["params"], batch, num_tokens, key)
    else:
      microbatches = _split_microbatches(batch, cfg.num_microbatches)

      def accumulate(carry, xs):
        index, mb = xs
        (loss_i, sums_i), grads_i = grad_fn(
          state["params"], mb, num_tokens, jax.random.fold_in(key, index)
        )
        loss_acc, sums_acc, grads_acc = carry
        return (
          loss_acc + loss_i,
          jax.tree.map(jnp.add, sums_acc, sums_i),
          jax.tree.map(jnp.add, grads_acc, grads_i),
        ), None

      zero_sums = jax.eval_shape(
        lambda: grad_fn(
          state["params"], jax.tree.map(lambda x: x[0], microbatches), num_tokens, key
        )[0][1]
      )
      init = (
        jnp.float32(0.0),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums),
        jax.tree.map(jnp.zeros_like, state["params"]),
      )
      (loss, sums, grads), _ = jax.lax.scan(
        accumulate, init, (jnp.arange(cfg.num_microbatches), microbatches)
      )
      # Sums stay sums; MoE metrics (per-microbatch means) become means over microbatches.
      sums = {
        k: v if k in ("ce_sum", "z_sum", "correct") else v / cfg.num_microbatches
        for k, v in sums.items()
      }
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {k: v for k, v in sums.items() if k not in ("ce_sum", "z_sum", "correct")}
    metrics.update(
      {
        "loss": loss,
        "cross_entropy": sums["ce_sum"] / num_tokens,
        "z_loss": sums["z_sum"] / num_tokens,
        "accuracy": sums["correct"] / num_tokens,
        "learning_rate": schedule(step),
        "grad_norm": optax.tree.norm(grads),
        "num_target_tokens": num_tokens,
      }
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    new_state = {
      "step": step + 1,
      "params": params,
      "opt_state": opt_state,
      "nonfinite": jnp.where(finite, state["nonfinite"], step + 1),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: SwitchTransformer, cfg: TrainConfig) -> Callable:
  """eval_step(params, batch) -> metrics, in eval mode (eval capacity factor, no dropout)."""

  def eval_step(params, batch):
    logits, state = model.apply(
      {"params": params},
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      batch["decoder_target_tokens"],
      enable_dropout=False,
      mutable=["intermediates"],
    )
    _, metrics = losses.loss_and_metrics(
      logits,
      batch,
      state["intermediates"],
      z_loss=cfg.z_loss,
      label_smoothing=cfg.label_smoothing,
      aux_loss_factor=cfg.aux_loss_factor,
      router_z_loss_factor=cfg.router_z_loss_factor,
    )
    return metrics

  return eval_step


# --------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class RunResult:
  """What a run did: the step reached, the logged training losses by step, the last eval."""

  step: int
  losses: dict[int, float]
  eval_metrics: dict[str, float]
  stopped_by: str | None = None


class _StopSignals:
  """Records SIGTERM / SIGINT so the loop can save a checkpoint before exiting."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train(
  config: Config,
  workdir,
  *,
  devices: Sequence[jax.Device] | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
) -> RunResult:
  """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns a summary.

  Args:
    config: the run's Config (validated).
    workdir: checkpoints, metrics.jsonl, TensorBoard events and config.json go here.
    devices: devices of the mesh (default: all, over all processes).
    progress: show a progress bar (process 0).
    log: where process 0's messages go.
  """
  config.validate()
  with _StopSignals() as signals:  # a SIGTERM during start-up stops after the first step
    return _train(config, pathlib.Path(workdir), devices, progress, log, signals)


def _train(
  config: Config, workdir: pathlib.Path, devices, progress: bool, log, signals: _StopSignals
) -> RunResult:
  """The body of `train`, with the stop signals already watched."""
  from switchjax.data import make_pretraining_data  # local: keeps `import switchjax` light

  cfg, tcfg = config, config.train
  is_main = jax.process_index() == 0
  say = log if is_main else (lambda _: None)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"Config {cfg.name}:\n{format_config(cfg)}")

  mesh = sharding.make_mesh(cfg.mesh, expert_counts(cfg.model), devices)
  batch_shards = mesh.shape["data"] * mesh.shape["expert"]
  say(
    f"Mesh {dict(mesh.shape)} over {mesh.devices.size} devices "
    f"({jax.process_count()} processes, {mesh.devices.flat[0].device_kind})."
  )
  tcfg = dataclasses.replace(tcfg, num_microbatches=resolve_microbatches(tcfg, batch_shards))
  cfg = dataclasses.replace(cfg, train=tcfg)
  if tcfg.num_microbatches > 1:
    say(
      f"Gradient accumulation: {tcfg.num_microbatches} microbatches of "
      f"{tcfg.batch_size // tcfg.num_microbatches} sequences per step."
    )
  for line in routing_summary(cfg, batch_shards):
    say(line)

  data = make_pretraining_data(
    cfg.data,
    tcfg.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    model_vocab_size=cfg.model.vocab_size,
  )
  say(f"Data: {data.describe()}.")
  if is_main:
    _keep_tokenizer(data.tokenizer, workdir)

  model = SwitchTransformer(cfg.model)
  with jax.set_mesh(mesh), sharding.axis_rules():
    boxed = jax.eval_shape(functools.partial(init_params, model), jax.random.key(tcfg.seed))
    param_shapes = sharding.unbox(boxed)
    param_axes = nn.get_partition_spec(boxed)  # logical axis names
    param_specs = sharding.param_specs(boxed)
    param_shardings = jax.tree.map(
      lambda s: NamedSharding(mesh, s), param_specs, is_leaf=lambda x: isinstance(x, P)
    )
    tx = make_optimizer(tcfg, param_axes)
    opt_specs = opt_state_specs(tcfg, param_shapes, param_axes)
    opt_shardings = jax.tree.map(
      lambda s: NamedSharding(mesh, s), opt_specs, is_leaf=lambda x: isinstance(x, P)
    )
    opt_shapes = jax.eval_shape(tx.init, param_shapes)
    scalar = sharding.replicated(mesh)
    state_shardings = {
      "step": scalar,
      "params": param_shardings,
      "opt_state": opt_shardings,
      "nonfinite": scalar,
    }
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes))
    say(f"Model: {num_params:,} parameters.")

    store = checkpoint.CheckpointStore(workdir, keep=tcfg.keep_checkpoints)
    restored = store.restore_latest(
      sharding.abstract_tree(param_shapes, param_shardings),
      sharding.abstract_tree(opt_shapes, opt_shardings),
      report=say,
    )
    if is_main:  # after the checks above: an incompatible workdir keeps its own config
      save_config(cfg, workdir / checkpoint.CONFIG_FILE)
    if restored is not None:
      step0 = int(restored["meta"]["step"])
      state = {
        "step": jax.device_put(jnp.int32(step0), scalar),
        "params": restored["params"],
        "opt_state": restored["opt_state"],
        "nonfinite": jax.device_put(jnp.int32(0), scalar),
      }
      data.train.set_state(restored["meta"]["data"])
      say(f"Resumed from {workdir / checkpoint.CHECKPOINTS} step {step0}.")
    else:
      step0 = 0
      if tcfg.init_from:
        _, params = checkpoint.load_model(tcfg.init_from, shardings=param_shardings)
        say(f"Initialised parameters from {tcfg.init_from}.")
      else:
        params = jax.jit(lambda k: nn.unbox(init_params(model, k)), out_shardings=param_shardings)(
          jax.random.key(tcfg.seed)
        )
      opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
      state = {
        "step": jax.device_put(jnp.int32(0), scalar),
        "params": params,
        "opt_state": opt_state,
        "nonfinite": jax.device_put(jnp.int32(0), scalar),
      }

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
      make_train_step(model, tx, tcfg),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, scalar),
      donate_argnums=(0,),
    )
    eval_step = jax.jit(
      make_eval_step(model, tcfg),
      in_shardings=(param_shardings, batch_sharding),
      out_shardings=scalar,
    )

    writer = MetricsWriter(workdir, enabled=is_main)
    flops = train_flops_per_example(cfg) * tcfg.batch_size
    peak = peak_tflops(mesh.devices.flat[0], tcfg.peak_tflops_per_device)
    tokens_per_step = tcfg.batch_size * (cfg.data.inputs_length + cfg.data.targets_length)
    result = RunResult(step=step0, losses={}, eval_metrics={})

    def save(step):
      nonfinite = int(state["nonfinite"])
      if nonfinite:
        raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {nonfinite}; stopping without saving. The "
          f"last good checkpoint ({_last_step(store)}) is kept in {workdir}. Lower "
          "train.learning_rate, raise train.router_z_loss_factor or check the data."
        )
      store.save(step, state["params"], state["opt_state"], {"data": data.train.get_state()})

    def evaluate(step):
      totals: dict[str, list] = {}
      for batch in data.eval_batches(tcfg.eval_steps):
        m = eval_step(state["params"], sharding.host_local_to_global(mesh, batch))
        for k, v in m.items():
          totals.setdefault(k, []).append(v)
      metrics = {
        f"eval/{k}": float(np.mean(jax.device_get(v)))
        for k, v in totals.items()
        if not k.startswith("layers/")
      }
      writer.write(step, metrics)
      say(
        f"step {step}: eval loss {metrics['eval/loss']:.4f}, cross-entropy "
        f"{metrics['eval/cross_entropy']:.4f}, accuracy {metrics['eval/accuracy']:.3f}"
      )
      return metrics

    pending: list[dict[str, Array]] = []
    bar = _progress_bar(step0, tcfg.num_train_steps, enabled=progress and is_main)
    timer = _StepTimer()
    try:
      step = step0
      while step < tcfg.num_train_steps:
        batch = sharding.host_local_to_global(mesh, next(data.train))
        state, metrics = train_step(state, batch)
        step += 1
        pending.append(metrics)
        bar.update(1)
        if step % tcfg.log_every == 0 or step == tcfg.num_train_steps:
          steps_done = len(pending)
          logged = _mean_metrics(pending)  # waits for the steps to finish
          pending = []
          elapsed = timer.read_and_reset()
          logged["tokens_per_second"] = tokens_per_step * steps_done / elapsed
          logged["seconds_per_step"] = elapsed / steps_done
          logged["model_tflops_per_device"] = (
            flops * steps_done / elapsed / 1e12 / mesh.devices.size
          )
          if peak:
            logged["mfu"] = logged["model_tflops_per_device"] / peak
          if int(state["nonfinite"]):
            save(step)  # raises NonFiniteLossError
          writer.write(step, logged)
          result.losses[step] = logged["loss"]
          bar.set_postfix(loss=f"{logged['loss']:.3f}", ce=f"{logged['cross_entropy']:.3f}")
          if bar.enabled:
            bar.write(_format_log(step, logged))  # above the progress bar
          else:
            say(_format_log(step, logged))
        do_eval = bool(tcfg.eval_every and step % tcfg.eval_every == 0 and data.num_eval_chunks)
        stop = _any_process(signals.received is not None)
        do_save = step % tcfg.checkpoint_every == 0 or step == tcfg.num_train_steps or stop
        if do_eval or do_save:
          timer.pause(state)
          if do_eval:
            result.eval_metrics = evaluate(step)
          if do_save:
            save(step)
          timer.resume()
        if stop:
          result.stopped_by = signals.received or "another process"
          say(
            f"\nStopped by {result.stopped_by} at step {step}; checkpoint saved. Run the "
            "same command to resume."
          )
          break
      if (
        result.stopped_by is None
        and data.num_eval_chunks
        and (not tcfg.eval_every or step % tcfg.eval_every)
      ):
        result.eval_metrics = evaluate(step)
    finally:
      bar.close()
      store.close()
      writer.close()
    result.step = step
    return result


# --------------------------------------------------------------------------------------------
# Helpers of the loop.


def resolve_microbatches(cfg: TrainConfig, batch_shards: int) -> int:
  """The number of microbatches: as configured, or (0) the fewest that keep every device at
  most `device_microbatch_size` sequences at a time. Checks that the batch splits evenly."""
  if cfg.batch_size % batch_shards:
    raise ValueError(
      f"train.batch_size={cfg.batch_size} must be divisible by the "
      f"{batch_shards} data x expert devices of the mesh."
    )
  per_device = cfg.batch_size // batch_shards
  n = cfg.num_microbatches
  if n == 0:
    n = -(-per_device // cfg.device_microbatch_size)
    while per_device % n:
      n += 1
  if per_device % n:
    raise ValueError(
      f"train.batch_size={cfg.batch_size} must be divisible by "
      f"train.num_microbatches x mesh data x mesh expert = {n} x "
      f"{batch_shards}."
    )
  return n


def expert_counts(model_cfg) -> tuple[int, ...]:
  """The expert counts of the encoder and decoder MoE layers (the mesh's expert axis must
  divide each)."""
  return tuple(sorted({model_cfg.moe.num_experts, model_cfg.moe_for("decoder").num_experts}))


def routing_summary(config: Config, batch_shards: int) -> list[str]:
  """Start-up log lines: each stack's routing groups, tokens per group and capacity, in
  training (per microbatch) and evaluation (per batch), for a batch split over
  `batch_shards` data x expert devices. Raises ValueError for a fixed moe.group_multiple
  that cannot split over them."""
  from switchjax.moe import group_layout

  model, train_cfg, data = config.model, config.train, config.data
  micro = train_cfg.batch_size // max(train_cfg.num_microbatches, 1)
  lines = []
  for stack, length in (("encoder", data.inputs_length), ("decoder", data.targets_length)):
    moe = model.moe_for(stack)
    parts = []
    for mode, batch in (("train", micro), ("eval", train_cfg.batch_size)):
      layout = group_layout(batch, length, moe, train=mode == "train", num_shards=batch_shards)
      parts.append(
        f"{mode}: {layout.num_groups} x {layout.tokens_per_group}-token groups per "
        f"{batch} x {length} tokens, capacity {layout.expert_capacity}"
      )
    rule = (
      f"a multiple of moe.group_multiple={moe.group_multiple}"
      if moe.group_multiple
      else f"a multiple of the {batch_shards} data x expert devices"
    )
    lines.append(
      f"Routing, {stack} ({moe.router_type}, {moe.num_experts} experts, groups {rule}): "
      + "; ".join(parts)
      + "."
    )
  return lines


def _keep_tokenizer(tokenizer, workdir: pathlib.Path) -> None:
  """Copies the tokenizer's model into the workdir (spiece.model) for generation later."""
  import shutil

  target = workdir / "spiece.model"
  source = pathlib.Path(tokenizer.spm_path)
  if source.resolve() != target.resolve():
    shutil.copyfile(source, target)


def _last_step(store: checkpoint.CheckpointStore) -> str:
  steps = store.steps()
  return f"step {steps[-1]}" if steps else "none yet"


def _any_process(flag: bool) -> bool:
  """True if `flag` is set on any process (all processes must agree to save and stop)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _mean_metrics(pending: list[dict[str, Array]]) -> dict[str, float]:
  values = jax.device_get(pending)
  return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def _format_log(step: int, m: dict[str, float]) -> str:
  text = (
    f"step {step}: loss {m['loss']:.4f}, cross-entropy {m['cross_entropy']:.4f}, "
    f"aux {m.get('auxiliary_loss', 0.0):.4f}, router z {m.get('router_z_loss', 0.0):.3f}, "
    f"dropped {m.get('fraction_tokens_left_behind', 0.0):.3f}, lr "
    f"{m['learning_rate']:.2e}, grad norm {m['grad_norm']:.3f}, "
    f"{m['tokens_per_second']:.0f} tokens/s"
  )
  return text + (f", MFU {m['mfu']:.1%}" if "mfu" in m else "")


class _StepTimer:
  """Wall time of training steps only: evaluation and checkpointing are left out."""

  def __init__(self):
    self.seconds, self._start = 0.0, time.time()

  def pause(self, state) -> None:
    jax.block_until_ready(state)  # the steps dispatched so far have finished
    self.seconds += time.time() - self._start

  def resume(self) -> None:
    self._start = time.time()

  def read_and_reset(self) -> float:
    seconds = self.seconds + time.time() - self._start
    self.seconds, self._start = 0.0, time.time()
    return max(seconds, 1e-9)


class _NoBar:
  enabled = False

  def update(self, n):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def _progress_bar(start: int, total: int, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm.auto import tqdm

  bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
  bar.enabled = True
  return bar
