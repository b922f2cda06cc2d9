"""Fine-tune a Switch Transformer on text-to-text pairs (the Switch paper's recipe).

  python scripts/finetune.py --config=runs/small                # the bundled task, offline
  python scripts/finetune.py --config=runs/small --train=train.tsv --eval=dev.tsv
  python scripts/finetune.py --config=converted/switch-base-8 --train=t.jsonl --eval=d.jsonl \
      --set finetune.input_field=question --set finetune.target_field=answer

--config is a checkpoint directory (a pretraining workdir, a converted model, or another
fine-tuning run's WORKDIR/best), whose parameters and tokenizer start the run, or a preset
(trained from scratch). Files are .tsv (input<TAB>target) or .jsonl. The recipe (dropout 0.1,
expert dropout 0.4, constant learning rate 1e-3) comes before --set, which overrides it. The
run resumes from WORKDIR's newest checkpoint, keeps the best one in WORKDIR/best, and saves
and exits on SIGTERM or Ctrl-C, as pretraining does.
"""

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="a checkpoint directory or a preset name")
  parser.add_argument("--train", default=None, help="training pairs (.tsv or .jsonl)")
  parser.add_argument("--eval", default=None, help="eval pairs (.tsv or .jsonl)")
  parser.add_argument("--task", default=None, help="bundled task when no files are given")
  parser.add_argument(
    "--workdir", default=None, help="checkpoints, logs and config (default: runs/<name>-finetune)"
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a config field, e.g. --set train.num_train_steps=500 (repeatable)",
  )
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--no_progress", action="store_true", help="log lines, no progress bar")
  args = parser.parse_args(argv)

  from switchjax import sharding

  sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  from switchjax.config import load_config
  from switchjax.training import NonFiniteLossError
  from switchjax.training.finetune import finetune, finetune_config

  try:
    config = finetune_config(load_config(args.config), args.train, args.eval, args.set, args.task)
    workdir = args.workdir or f"runs/{config.name}-finetune"
    result = finetune(config, workdir, progress=not args.no_progress)
  except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  metrics = result.eval_metrics
  if "eval/exact_match" in metrics:
    print(
      f"Fine-tuned to step {result.step} in {workdir}: eval loss {metrics['eval/loss']:.3f}, "
      f"exact match {metrics['eval/exact_match']:.3f}; best checkpoint in {workdir}/best."
    )
  else:
    print(f"Stopped at step {result.step} in {workdir}.")
  return 130 if result.stopped_by else 0


if __name__ == "__main__":
  sys.exit(main())
