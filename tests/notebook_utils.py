"""Running a notebook in tests: its code cells in order in one namespace, outputs stored."""

import base64
import contextlib
import io
import pathlib

import matplotlib
import nbformat

matplotlib.use("Agg")  # before pyplot: figures render off-screen
import matplotlib.pyplot as plt  # noqa: E402


def run_notebook(path: pathlib.Path):
  """Executes a notebook's code cells in order in one namespace, as a kernel would, and
  returns (the notebook with outputs, the namespace). Each cell's stdout becomes a stream
  output and each matplotlib figure it leaves open a PNG display output."""
  nb = nbformat.read(path, as_version=4)
  namespace = {"__name__": "__main__"}
  count = 0
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    count += 1
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
      exec(compile(cell.source, f"{path.name}, code cell {count}", "exec"), namespace)
    outputs = []
    if stdout.getvalue():
      outputs.append(nbformat.v4.new_output("stream", name="stdout", text=stdout.getvalue()))
    for number in plt.get_fignums():
      png = io.BytesIO()
      plt.figure(number).savefig(png, format="png", dpi=72, bbox_inches="tight")
      outputs.append(
        nbformat.v4.new_output(
          "display_data", data={"image/png": base64.b64encode(png.getvalue()).decode()}
        )
      )
    plt.close("all")
    cell.outputs, cell.execution_count = outputs, count
  return nb, namespace
