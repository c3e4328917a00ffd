"""What the checkpoint checksums (ssl_us/checkpoint.py) cost, against orbax alone.

  python -m benchmarks.checkpoint_checksums [--case simclr_resnet50] [--repeats 3]

The state of a device_bench case (ResNet-50 SimCLR at 224x224 by default: parameters, LARS
momentum, BatchNorm statistics; every float random, as incompressible as a trained state) is
saved with the run's CheckpointManager, with and without
checksums, each save timed until orbax has finished it (``wait_until_finished``; in a run the
save and the checksums are in orbax's background thread and overlap the next steps). Also timed:
the hashing alone (``write_checksums``, the callback's work), and the check a resume does
(``verify_checksums``) against orbax's restore of the same step. Minimum over interleaved
repeats; one JSON line per setting, then the ratios.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
import time


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--case", default="simclr_resnet50")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from benchmarks import device_bench  # pylint: disable=g-import-not-at-top
  from ssl_us import checkpoint, input_pipeline  # pylint: disable=g-import-not-at-top

  spec = dict(device_bench.case_spec(args.case, tiny=False), batch=2)
  config, _, _, init = device_bench._step(spec)  # pylint: disable=protected-access
  state = jax.jit(init)(jax.random.key(0), device_bench.host_batch(spec))
  # As after training: every float (the momentum too, zeros at init, which compress to nothing
  # on disk) random, so the files are as large as a trained run's.
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state = jax.tree.unflatten(treedef, [
      jax.random.normal(k, x.shape, x.dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
      else x for k, x in zip(keys, leaves)])
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  position = input_pipeline.InputPosition(0)
  times = {False: collections.defaultdict(list), True: collections.defaultdict(list)}
  root = tempfile.mkdtemp(prefix="ssl_us_checksums_")
  try:
    for r in range(args.repeats):          # interleaved, so drift hits both settings alike
      for checksums in (False, True):
        wd = os.path.join(root, f"{checksums}-{r}")
        manager = checkpoint.make_manager(wd, config, checksums=checksums)
        t = time.perf_counter()
        checkpoint.save(manager, 1, state, position)
        manager.wait_until_finished()
        times[checksums]["save_s"].append(time.perf_counter() - t)
        step_dir = os.path.join(wd, "checkpoints", "1")
        t = time.perf_counter()
        assert checkpoint.verify_checksums(step_dir) is checksums
        times[checksums]["verify_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        checkpoint.write_checksums(step_dir)   # what the callback did inside the save
        times[checksums]["write_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        manager.restore(1, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(checkpoint._abstract(state))))  # pylint: disable=protected-access
        times[checksums]["restore_s"].append(time.perf_counter() - t)
        manager.close()
        on_disk = sum(os.path.getsize(os.path.join(step_dir, f))
                      for f in checkpoint._item_files(step_dir))  # pylint: disable=protected-access
        shutil.rmtree(wd)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  results = {}
  for checksums in (False, True):
    results[checksums] = {"checksums": checksums, "state_MiB": round(state_bytes / 2**20, 1),
                          "files_MiB": round(on_disk / 2**20, 1),
                          **{k: round(min(v), 3) for k, v in times[checksums].items()}}
    if not checksums:
      del results[checksums]["verify_s"]
    print(json.dumps({"case": args.case, "backend": jax.default_backend(),
                      **results[checksums]}), flush=True)
  off, on = results[False], results[True]
  print(f"save with checksums / without: {on['save_s'] / off['save_s']:.2f}x; hashing / orbax's "
        f"save alone: {on['write_s'] / off['save_s']:.2f}x; a resume's check / orbax's restore: "
        f"{on['verify_s'] / on['restore_s']:.2f}x")


if __name__ == "__main__":
  main()
