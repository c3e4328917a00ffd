"""config.profile: traced steps change nothing; the trace's summary against hand-computed times."""
import glob
import os

import pytest
from jax.profiler import ProfileData

from configs import simclr_muscle
from ssl_us import checkpoint, parallel, profiling, train
from tests import fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("data")), num_videos=8, frames=4)


def tiny_config(data_dir, start_step=0, num_steps=0):
  c = simclr_muscle.get_config("runlocal")
  c.data.dir, c.data.num_workers = data_dir, 0
  c.image_size, c.batch_size, c.num_steps = (16, 16), 8, 4
  c.log_every, c.ckpt_every, c.progress_bar = 2, 4, False
  c.model.encoder_kwargs.update(width=4, dropout_rate=0.0)
  c.model.head_hidden, c.model.head_out = (16,), 8
  c.profile.update(start_step=start_step, num_steps=num_steps)
  return c


def test_traced_steps_are_in_the_trace_and_change_nothing(dataset, tmp_path):
  """Steps 2-3 of 4 traced: the trace holds their step annotations and the step's XLA ops, a
  summary.md lies beside it, and losses and final state equal the untraced run bit for bit."""
  mesh = parallel.make_mesh(2)
  said = []
  plain = train.train_and_evaluate(tiny_config(dataset), str(tmp_path / "plain"), mesh=mesh)
  traced = train.train_and_evaluate(tiny_config(dataset, start_step=1, num_steps=2),
                                    str(tmp_path / "traced"), mesh=mesh, log_fn=said.append)
  assert traced["loss"] == plain["loss"] and len(plain["loss"]) == 2
  fixtures.assert_states_equal(checkpoint.load_state(str(tmp_path / "traced"))[2],
                               checkpoint.load_state(str(tmp_path / "plain"))[2])
  assert not glob.glob(str(tmp_path / "plain" / "logs" / "plugins" / "*"))

  files = profiling.trace_files(str(tmp_path / "traced" / "logs"))
  assert len(files) == 1
  steps = []
  for plane in ProfileData.from_file(files[0]).planes:
    for line in plane.lines:
      steps += [dict(e.stats)["step_num"] for e in line.events if e.name == "train"]
  assert sorted(steps) == [2, 3]
  s = profiling.summarize(files[0], steps=2)
  assert s["where"] == "host" and s["op_ms_per_step"] > 0     # the CPU backend's thunks
  assert any("train_step" in o["module"] for o in s["ops"]), s["ops"]
  with open(os.path.join(os.path.dirname(files[0]), "summary.md")) as f:
    summary = f.read()
  assert summary.startswith("# Steps 2-3\n") and "| op | kind | ms/step |" in summary
  assert [m for m in said if m.startswith("profile of steps 2-3: ")], said


def test_a_window_outside_the_run_says_so_and_traces_nothing(dataset, tmp_path):
  said = []
  train.train_and_evaluate(tiny_config(dataset, start_step=4, num_steps=2), str(tmp_path),
                           mesh=parallel.make_mesh(1), log_fn=said.append)
  assert "config.profile: steps 5-6 are not among this run's steps 1-4; no trace" in said
  assert not profiling.trace_files(str(tmp_path / "logs"))


@pytest.mark.parametrize("key,value", [("num_steps", -1), ("start_step", -3),
                                       ("num_steps", True)])
def test_profile_config_errors_name_the_key(dataset, key, value):
  c = tiny_config(dataset)
  c.profile[key] = value
  with pytest.raises(ValueError, match=f"config.profile.{key} must be an int >= 0"):
    train.build(c, parallel.make_mesh(1))


# Two steps' worth of events, with times in ps: on the GPU stream, fusion.1 (3 + 1 ms, two
# kernels), custom-call.7 (5 ms); an 'XLA Ops' line derived from them (must not count twice);
# a host thunk (ignored: the device has ops). By hand, per step: 9 ms / 2 = 4.5 ms of ops;
# custom-call.7 2.5 ms (5/9 of the time), fusion.1 2.0 ms (4/9).
_TRACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000000
             stats { metadata_id: 10 str_value: "fusion.1" }
             stats { metadata_id: 11 str_value: "jit_train_step" } }
    events { metadata_id: 2 offset_ps: 4000000000 duration_ps: 1000000000
             stats { metadata_id: 10 str_value: "fusion.1" } }
    events { metadata_id: 3 offset_ps: 6000000000 duration_ps: 5000000000
             stats { metadata_id: 10 str_value: "custom-call.7" }
             stats { metadata_id: 11 str_value: "jit_train_step" } } }
  lines { id: 2 name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 4 offset_ps: 0 duration_ps: 9000000000
             stats { metadata_id: 10 str_value: "fusion.1" } } }
  event_metadata { key: 1 value { id: 1 name: "loop_fusion_kernel" } }
  event_metadata { key: 2 value { id: 2 name: "loop_fusion_kernel_2" } }
  event_metadata { key: 3 value { id: 3 name: "sm90_xmma_fprop" } }
  event_metadata { key: 4 value { id: 4 name: "fusion.1" } }
  stat_metadata { key: 10 value { id: 10 name: "hlo_op" } }
  stat_metadata { key: 11 value { id: 11 name: "hlo_module" } }
}
planes {
  id: 2 name: "/host:CPU"
  lines { id: 1 name: "python" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 7000000000
             stats { metadata_id: 10 str_value: "dot.2" } } }
  event_metadata { key: 1 value { id: 1 name: "dot.2" } }
  stat_metadata { key: 10 value { id: 10 name: "hlo_op" } }
}
"""


def test_summary_by_hand(tmp_path):
  path = tmp_path / "t.xplane.pb"
  path.write_bytes(ProfileData.text_proto_to_serialized_xspace(_TRACE))
  s = profiling.summarize(str(path), steps=2, wall_s=0.012)
  assert s["where"] == "device" and s["steps"] == 2
  assert s["op_ms_per_step"] == pytest.approx(4.5) and s["wall_ms_per_step"] == pytest.approx(6)
  assert [(o["op"], o["kind"], o["count"], o["kernel"], o["module"]) for o in s["ops"]] == [
      ("custom-call.7", "custom-call", 1, "sm90_xmma_fprop", "jit_train_step"),
      ("fusion.1", "fusion", 2, "loop_fusion_kernel", "jit_train_step")]
  assert [o["ms_per_step"] for o in s["ops"]] == pytest.approx([2.5, 2.0])
  assert [o["share"] for o in s["ops"]] == pytest.approx([5 / 9, 4 / 9])
  assert [(k["kind"], k["ms_per_step"]) for k in s["kinds"]] == [
      ("custom-call", pytest.approx(2.5)), ("fusion", pytest.approx(2.0))]
  text = profiling.markdown(s, title="t")
  assert "6.00 ms wall per step, 4.50 ms of XLA ops per step on the device" in text
  assert "| custom-call.7 | custom-call | 2.500 | 55.6% | 1 | jit_train_step |" in text
  one = profiling.summarize(str(path), steps=2, top=1)
  assert [o["op"] for o in one["ops"]] == ["custom-call.7"]
  assert [(k["kind"], k["ms_per_step"]) for k in one["kinds"]] == [
      ("custom-call", pytest.approx(2.5)), ("1 other kinds", pytest.approx(2.0))]


def test_summary_reads_a_tpu_like_plane_from_its_xla_ops_line(tmp_path):
  """Where only the profiler's 'XLA Ops' line holds the ops (op names as event names, no
  hlo_op stat), they are read from it; the 'XLA Modules' line is not an op."""
  trace = """
  planes { id: 1 name: "/device:TPU:0"
    lines { id: 1 name: "XLA Modules" timestamp_ns: 0
      events { metadata_id: 3 offset_ps: 0 duration_ps: 8000000000 } }
    lines { id: 2 name: "XLA Ops" timestamp_ns: 0
      events { metadata_id: 1 offset_ps: 0 duration_ps: 6000000000 }
      events { metadata_id: 2 offset_ps: 6000000000 duration_ps: 2000000000 }
      events { metadata_id: 1 offset_ps: 9000000000 duration_ps: 1000000000 } }
    event_metadata { key: 1 value { id: 1 name: "convolution.4" } }
    event_metadata { key: 2 value { id: 2 name: "all-reduce.1" } }
    event_metadata { key: 3 value { id: 3 name: "jit_train_step" } }
  }"""
  path = tmp_path / "t.xplane.pb"
  path.write_bytes(ProfileData.text_proto_to_serialized_xspace(trace))
  s = profiling.summarize(str(path), steps=1)
  assert s["where"] == "device" and s["op_ms_per_step"] == pytest.approx(9)
  assert [(o["op"], o["count"], o["ms_per_step"]) for o in s["ops"]] == [
      ("convolution.4", 2, pytest.approx(7)), ("all-reduce.1", 1, pytest.approx(2))]


@pytest.mark.parametrize("op,kind", [("fusion.12", "fusion"), ("all-reduce.3", "all-reduce"),
                                     ("convolution", "convolution"), ("dot.2.1", "dot.2")])
def test_op_kind(op, kind):
  assert profiling.op_kind(op) == kind
