"""Fine-tune a Switch Transformer on text-to-text pairs (the Switch paper's recipe).

  python scripts/finetune.py --config=runs/small                # the bundled task, offline
  python scripts/finetune.py --config=runs/small --train=train.tsv --eval=dev.tsv
  python scripts/finetune.py --config=converted/switch-base-8 --train=t.jsonl --eval=d.jsonl \
      --set finetune.input_field=question --set finetune.target_field=answer

--config is a checkpoint directory (a pretraining workdir, a converted model, or another
fine-tuning run's WORKDIR/best), whose parameters and tokenizer start the run, or a preset
(trained from scratch). Files are .tsv (input<TAB>target) or .jsonl. The recipe (dropout 0.1,
expert dropout 0.4, constant learning rate 1e-3) comes before --set, which overrides it. The
run resumes from WORKDIR's newest checkpoint (the resume rules of pretraining), keeps the best
one in WORKDIR/best, and saves and exits on SIGTERM or Ctrl-C (status 130); errors print one
line and exit with status 1. Run as a script it restarts once with XLA's buffers on huge pages
(switchjax/huge_pages.py; GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out).
"""

import argparse
import sys


def main(argv=None) -> int:
  from switchjax import huge_pages
  from switchjax.training import cli

  huge_pages.reexec_script(argv)  # from the command line: once restarted, on huge pages

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="a checkpoint directory or a preset name")
  parser.add_argument("--train", default=None, help="training pairs (.tsv or .jsonl)")
  parser.add_argument("--eval", default=None, help="eval pairs (.tsv or .jsonl)")
  parser.add_argument("--task", default=None, help="bundled task when no files are given")
  cli.add_run_flags(parser, workdir_default="runs/<config name>-finetune")
  args = parser.parse_args(argv)

  def start():
    from switchjax.config import load_config
    from switchjax.training.finetune import finetune, finetune_config

    base = load_config(args.config)
    config = finetune_config(base, args.train, args.eval, args.set, args.task)
    workdir = args.workdir or f"runs/{config.name}-finetune"
    return workdir, finetune(config, workdir, **cli.train_options(args))

  return cli.run_command(args, start, report)


def report(workdir, result) -> None:
  metrics = result.eval_metrics
  if "eval/exact_match" in metrics:
    print(
      f"Fine-tuned to step {result.step} in {workdir}: eval loss {metrics['eval/loss']:.3f} "
      f"(on {int(metrics['eval/examples'])} eval examples), exact match "
      f"{metrics['eval/exact_match']:.3f}; best checkpoint in {workdir}/best."
    )
  else:
    print(f"Stopped at step {result.step} in {workdir}.")


if __name__ == "__main__":
  sys.exit(main())
