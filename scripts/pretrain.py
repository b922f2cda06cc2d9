"""Pretrain a Switch Transformer with T5 span corruption.

  python scripts/pretrain.py --config=small                  # quick start on a CPU
  python scripts/pretrain.py --config=base8 --workdir=runs/base8 --set mesh.expert=8
  python scripts/pretrain.py --config=base8 --set data.paths='corpus/*.jsonl' \
      --set train.batch_size=64

The run resumes from the newest checkpoint in --workdir (the resume rules are in the README:
settings that would change the model or its tokenizer are refused, a changed data order needs
--restart_data). Multi-host: every process runs the same command; pass
--coordinator_address/--num_processes/--process_id, or nothing on TPU pods and clusters whose
environment JAX reads. Expected errors print one line and exit with status 1; SIGTERM or Ctrl-C
stops with status 130 (at once during start-up, after saving a checkpoint once training).
Run as a script it restarts once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (XLA's buffers on
transparent huge pages, switchjax/huge_pages.py: ~20% faster steps on CPU); set
glibc.malloc.hugetlb=0 there to opt out.
"""

import argparse
import sys


def main(argv=None) -> int:
  from switchjax import huge_pages
  from switchjax.training import cli

  huge_pages.reexec_script(argv)  # from the command line: once restarted, on huge pages

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--config",
    default="small",
    help="a preset in configs/ (small, tiny, base8, ..., c2048) or a .py file",
  )
  cli.add_run_flags(parser, workdir_default="runs/<config name>")
  args = parser.parse_args(argv)

  def start():
    from switchjax.config import load_config
    from switchjax.training import train

    config = load_config(args.config, args.set)
    workdir = args.workdir or f"runs/{config.name}"
    return workdir, train(config, workdir, **cli.train_options(args))

  return cli.run_command(args, start, report)


def report(workdir, result) -> None:
  if result.losses:
    first, last = min(result.losses), max(result.losses)
    print(
      f"Trained to step {result.step} in {workdir}: loss {result.losses[first]:.3f} "
      f"(step {first}) -> {result.losses[last]:.3f} (step {last})."
    )
  else:
    print(f"Nothing to do: {workdir} is already at step {result.step}.")


if __name__ == "__main__":
  sys.exit(main())
