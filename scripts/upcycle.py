"""Sparse upcycling: a dense T5 checkpoint becomes a Switch model (Komatsuzaki et al., 2022).

  python scripts/upcycle.py --dense=runs/dense --config=small --output_dir=runs/upcycled
  python scripts/upcycle.py --dense=t5-v1_1-base --config=base8 --output_dir=ckpt/upcycled \
      --set model.mlp_activations=gelu,linear --set model.tie_embeddings=false
  python scripts/pretrain.py --config=runs/upcycled --workdir=runs/upcycled_train

--dense is a switchjax checkpoint without sparse layers (a pretrain.py workdir or a saved model)
or a Hugging Face T5ForConditionalGeneration directory. The experts of every MoE layer of
--config (plus --set overrides) start as copies of the dense MLP they replace, the routers are
freshly initialised (--seed), everything else is the dense model's. With Switch's router each
MoE output is p(x) * dense_mlp(x) (p: the router probability of the token's expert, what T5X's
sparse_upcycle.gin trains); --set model.moe.router_type=tokens_choose_renormalized renormalises
the combine weights so that the upcycled model computes exactly the dense model. --verify
measures both on a random batch with capacity for every token. Expected errors (a dense model
that does not fit the config, a non-empty --output_dir) print one line and exit with status 1.
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dense", required=True, help="dense switchjax checkpoint or HF T5 dir")
  parser.add_argument("--config", required=True, help="the Switch preset, .py or config.json")
  parser.add_argument("--output_dir", required=True, help="the switchjax checkpoint to write")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a config field, e.g. --set model.moe.num_experts=16 (repeatable)",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
  parser.add_argument("--overwrite", action="store_true", help="replace a previous output")
  parser.add_argument(
    "--verify", action="store_true", help="compare the upcycled and dense logits afterwards"
  )
  args = parser.parse_args(argv)

  from switchjax import checkpoint, model_loading, upcycle
  from switchjax.config import load_config
  from switchjax.config.sparse_layout import decoder_sparse_layers, encoder_sparse_layers

  checkpoint.release_memory_eagerly()
  try:
    config = load_config(args.config, args.set)
    config = upcycle.upcycle(
      args.dense, config, args.output_dir, seed=args.seed, overwrite=args.overwrite
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  m = config.model
  print(
    f"Wrote {args.output_dir}: {m.moe.num_experts} experts in encoder layers "
    f"{encoder_sparse_layers(m)} and decoder layers {decoder_sparse_layers(m)}, "
    f"routed by {m.moe.router_type}; train it with "
    f"python scripts/pretrain.py --config={args.output_dir} --workdir=DIR"
  )
  if args.verify:
    _, params = model_loading.load_model(args.output_dir)
    dense = upcycle.read_dense(args.dense)
    differences = upcycle.logit_differences(dense, m, params)
    print(
      "max |logits - dense logits|, renormalized combine weights: "
      f"{differences['renormalized']:.3g} (the upcycled model computes the dense model)"
    )
    print(
      "max |logits - dense logits|, router probability: "
      f"{differences['router probability']:.3g} (each MoE output is p(x) * dense_mlp(x))"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
