"""Traces of training steps for TensorBoard's profile tab, and a text summary of each trace.

``config.profile.num_steps = K`` (0: off) traces steps ``start_step + 1 .. start_step + K`` of a
run (``train.train_and_evaluate``), on process 0, with ``jax.profiler`` into
``<workdir>/logs/plugins/profile/<time>/``: ``tensorboard --logdir <workdir>/logs`` shows it in
its Profile tab (``pip install tensorboard-plugin-profile``), next to the scalars. Every step is
a ``StepTraceAnnotation('train', step_num=step)``, so the profile tools see step boundaries.

The window is exact: the device is waited for before the first traced step and after the last,
two host syncs that happen once per run and change no result (tests/test_profiling.py).

``summarize`` reads a trace with jaxlib's ``ProfileData`` (no TensorBoard needed) and writes
``summary.md`` beside it: wall time per traced step, the time the device spent in XLA ops per
step, and the ops that took the most time, also grouped by kind (``convolution``,
``custom-call``: cuDNN and cuBLAS calls on GPU, ``fusion``, collectives...). On a GPU or TPU the
ops are the kernels on the device planes; on CPU they are the XLA runtime's thunks, summed over
its threads (so the op time can exceed the wall time). benchmarks/device_bench.py prints the
same summary for each case with ``--profile DIR``, and benchmarks/bench_step.py's ``--profile``
lists its ops with their HLO lines.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import time

import jax

from data_prep import files as files_lib

# Lines that the profiler derives from other lines (they would count every op twice); 'XLA Ops'
# is read only where no other line holds the ops (``_plane_ops``).
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework Ops", "Framework Name Scope",
                  "Source code", "XLA TraceMe", "TensorFlow Name Scope", "TensorFlow Ops")


def validate(profile) -> None:
  """Raises naming the config key unless start_step and num_steps are ints >= 0."""
  for key in ("start_step", "num_steps"):
    v = profile.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f"config.profile.{key} must be an int >= 0, got {v!r}")


def trace_files(logdir: str) -> list[str]:
  """The xplane files under ``logdir`` (jax.profiler's layout), oldest first."""
  files = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
  return sorted(files, key=os.path.getmtime)


class StepTrace:
  """Traces steps start_step + 1 .. start_step + num_steps of the loop (1-based, as logged).

  ``start(step, state)`` before running step ``step + 1`` and ``stop(last, state)`` after step
  ``last``; each acts only at the window's edges and returns at once otherwise. ``close`` ends a
  window that the run's end or a preemption cut short.
  """

  def __init__(self, logdir: str, start_step: int, num_steps: int, *, enabled: bool, say):
    self.logdir, self.first, self.count = logdir, start_step, num_steps
    self.enabled = enabled and num_steps > 0
    self.say, self.active, self.t0, self.traced = say, False, 0.0, 0
    self.files = None    # (trace, summary.md) once written

  def check(self, start: int, end: int) -> None:
    """Says so once when the window lies outside this run's steps start + 1 .. end."""
    if self.enabled and not start <= self.first < end:
      self.say(f"config.profile: steps {self.first + 1}-{self.first + self.count} are not "
               f"among this run's steps {start + 1}-{end}; no trace")

  def start(self, step: int, state) -> None:
    if not self.enabled or step != self.first:
      return
    jax.block_until_ready(state)
    jax.profiler.start_trace(self.logdir)
    self.active, self.t0, self.traced = True, time.perf_counter(), 0

  def stop(self, last: int, state) -> None:
    if self.active:
      self.traced += 1
      if last == self.first + self.count:
        self._finish(last, state)

  def close(self, last: int, state) -> None:
    if self.active:
      self._finish(last, state)

  def _finish(self, last, state):
    jax.block_until_ready(state)
    wall = time.perf_counter() - self.t0
    jax.profiler.stop_trace()
    self.active = False
    path = trace_files(self.logdir)[-1]
    s = summarize(path, steps=self.traced, wall_s=wall)
    out = os.path.join(os.path.dirname(path), "summary.md")
    files_lib.write_text(out, markdown(s, title=f"Steps {self.first + 1}-{last}"))
    self.files = (path, out)
    self.say(f"profile of steps {self.first + 1}-{last}: {s['wall_ms_per_step']:.1f} ms/step, "
             f"XLA ops {s['op_ms_per_step']:.1f} ms/step on {s['where']}; top op "
             f"{s['ops'][0]['op'] if s['ops'] else '-'}. Trace and summary.md in "
             f"{os.path.dirname(path)} (tensorboard --logdir {self.logdir}, Profile tab)")


def summarize(path: str, *, steps: int, wall_s: float | None = None, top: int = 10) -> dict:
  """Op times of one xplane file: per op (hlo_op stat), per kind of op, per step.

  Device planes (``/device:...``) are read where they hold XLA ops, else the host's (the CPU
  backend runs its ops there); see ``_plane_ops`` for which lines count. Returns {'where',
  'steps', 'op_ms_per_step', 'wall_ms_per_step' (None without wall_s), 'ops': [{'op', 'kind',
  'module', 'kernel', 'count', 'ms_per_step', 'share'}] (the ``top`` longest), 'kinds':
  [{'kind', 'ms_per_step', 'share'}] (the ``top`` longest, then the others as one row)}.
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = ProfileData.from_serialized_xspace(f.read())
  events = {"device": [], "host": []}
  for plane in data.planes:
    where = ("device" if plane.name.startswith("/device:") else
             "host" if plane.name.startswith("/host:CPU") else None)
    if where is None:
      continue
    events[where] += _plane_ops(plane)
  where = "device" if events["device"] else "host"
  total_ns = collections.Counter()
  count, module, kernel = collections.Counter(), {}, {}
  longest = collections.Counter()
  for op, mod, name, ns in events[where]:
    total_ns[op] += ns
    count[op] += 1
    module[op] = module.get(op) or mod
    if ns >= longest[op]:
      longest[op], kernel[op] = ns, name
  all_ns = sum(total_ns.values())
  per_step = lambda ns: ns / 1e6 / max(steps, 1)  # noqa: E731
  share = lambda ns: ns / all_ns if all_ns else 0.0  # noqa: E731
  kinds = collections.Counter()
  for op, ns in total_ns.items():
    kinds[op_kind(op)] += ns
  kind_rows, rest = kinds.most_common(top), kinds.most_common()[top:]
  if rest:
    kind_rows.append((f"{len(rest)} other kinds", sum(ns for _, ns in rest)))
  return {
      "where": where, "steps": steps, "op_ms_per_step": per_step(all_ns),
      "wall_ms_per_step": None if wall_s is None else 1e3 * wall_s / max(steps, 1),
      "ops": [{"op": op, "kind": op_kind(op), "module": module[op],
               "kernel": kernel[op] if kernel[op] != op else "", "count": count[op],
               "ms_per_step": per_step(ns), "share": share(ns)}
              for op, ns in total_ns.most_common(top)],
      "kinds": [{"kind": k, "ms_per_step": per_step(ns), "share": share(ns)}
                for k, ns in kind_rows]}


def _plane_ops(plane) -> list[tuple[str, str, str, float]]:
  """(op, module, event name, ns) of a plane's XLA ops: the events that the runtime recorded
  with an ``hlo_op`` (GPU streams, CPU threads), or, where only the profiler's 'XLA Ops' line
  holds the ops (TPU), that line's events."""
  raw, derived = [], []
  for line in plane.lines:
    ops_line = line.name == "XLA Ops"
    if line.name in _DERIVED_LINES and not ops_line:
      continue
    for e in line.events:
      stats = dict(e.stats)
      if "hlo_op" in stats or ops_line:
        (derived if ops_line else raw).append(
            (str(stats.get("hlo_op", e.name)), str(stats.get("hlo_module", "")), e.name,
             e.duration_ns))
  return raw or derived


def op_kind(op: str) -> str:
  """An XLA op's kind: its name without the instruction number ('fusion.12' -> 'fusion')."""
  return re.sub(r"[.]\d+$", "", op)


def markdown(s: dict, title: str = "Profile") -> str:
  wall = (f"{s['wall_ms_per_step']:.2f} ms wall per step, " if s["wall_ms_per_step"] is not None
          else "")
  lines = [f"# {title}", "",
           f"{s['steps']} steps: {wall}{s['op_ms_per_step']:.2f} ms of XLA ops per step on the "
           f"{s['where']}" + (" (summed over threads)" if s["where"] == "host" else ""), "",
           "| kind | ms/step | share |", "|---|---|---|"]
  lines += [f"| {k['kind']} | {k['ms_per_step']:.3f} | {k['share']:.1%} |" for k in s["kinds"]]
  lines += ["", "| op | kind | ms/step | share | events | module | longest kernel |",
            "|---|---|---|---|---|---|---|"]
  lines += [f"| {o['op']} | {o['kind']} | {o['ms_per_step']:.3f} | {o['share']:.1%} | "
            f"{o['count']} | {o['module']} | {o['kernel'][:60]} |" for o in s["ops"]]
  return "\n".join(lines) + "\n"
