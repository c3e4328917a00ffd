"""Synthetic lung-ultrasound videos for the demo and the tests: ``python -m data_prep.synthetic``.

Every video is rendered in the polar (depth x lateral) grid of a convex probe and scan-converted
into a fan on a black square frame, with burned-in text and a depth scale outside the fan.

Scene (per frame): chest wall (soft tissue with fascia lines and hypoechoic vessels), ribs (bright
surface, acoustic shadow to the bottom), the pleural line, below it aerated lung (low-echo
artefact texture), multiplicative Rayleigh speckle and depth attenuation. The probe sweeps slowly
sideways over the video, so ribs and lung move under the fan; lung sliding shifts the lung
texture (and what lives in it) back and forth relative to the chest wall.

Video classes (``CLASSES``); all videos of a patient share the patient's class (as in COVID-BLUES,
where the label is the patient's PCR result), so splits must group by patient:
- ``normal``: A-lines (horizontal reverberations of the pleura at 2x, 3x, ... its depth), sliding.
- ``b_lines``: 2-4 B-lines (vertical bright comet tails from the pleura to the bottom of the fan,
  moving with sliding, erasing the A-lines they cross); A-lines between them as in ``normal``.
- ``consolidation``: one hypoechoic subpleural region with an irregular (shred) lower border and
  bright air-bronchogram dots, a weaker pleura above it and no A-lines under it; no lung sliding;
  A-lines elsewhere as in ``normal``.
Every class carries the same nuisances, drawn identically for every class: short Z-line comet
tails (locally like B-lines), A-lines of random strength, fascia lines and dark vessels in the
chest wall, ribs, the patient's geometry, tissue and speckle. Each frame's fan histogram is
mapped (by rank) onto a target distribution drawn per video independently of the class (wide
gain and gamma ranges), so brightness, contrast and histogram carry no class information: the
evidence is structural (where lines start and end, what lies below the pleura).

Per-frame anatomy labels come from what the centre of the fan shows (a band of +-``CENTRE_BAND``
of the fan width): coarse (``ANATOMY_COARSE``) rib_shadow when a rib covers the band, pleura when
the band is intercostal; fine (``ANATOMY_FINE``) splits pleura into consolidation / b_lines /
a_lines / pleura_only, by that priority. Frames where a rib covers the band partly are unlabeled.

Output layout under ``output``:
- ``<label>/<video_id>.mp4``: h264, yuv420p, crf ``CRF``, ``fps`` frames per second.
- ``manifest.csv``: ``MANIFEST_COLUMNS`` = path (relative to output), video_id, patient_id,
  label, exam (T1/T2/T3), side (left/right), probe, depth_cm (the last two are metadata).
- ``frame_labels.csv``: video_id, frame_index, anatomy_coarse, anatomy_fine (labelled frames).
- ``masks/<video_id>.npz``: ``masks`` uint8 (F, S, S) of ``MASK_CLASSES`` ids: 0 background
  (also outside the fan), 1 pleural_line, 2 consolidation, 3 b_line, 4 a_line, 5 rib_shadow (rib
  surface and its shadow); ``class_names`` the names in id order.
- ``boxes.csv``: video_id, frame_index, class (b_line/consolidation), y0, x0, y1, x1: the pixel
  bounding box (y1, x1 exclusive) of each visible pathology instance in each frame.
Every file is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import sys

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from data_prep import files as files_lib

CLASSES = ("normal", "b_lines", "consolidation")
ANATOMY_COARSE = ("pleura", "rib_shadow")
ANATOMY_FINE = ("a_lines", "b_lines", "consolidation", "pleura_only", "rib_shadow")
MASK_CLASSES = ("background", "pleural_line", "consolidation", "b_line", "a_line", "rib_shadow")
EXAMS = ("T1", "T2", "T3")
SIDES = ("left", "right")
PROBES = {"C3-1": (34.0, 40.0), "C5-2": (28.0, 34.0)}  # fan half-angle range, degrees
DEPTHS_CM = (8, 10, 12, 14)
MANIFEST_COLUMNS = ("path", "video_id", "patient_id", "label", "exam", "side", "probe",
                    "depth_cm")
FRAME_LABEL_COLUMNS = ("video_id", "frame_index", "anatomy_coarse", "anatomy_fine")
BOX_COLUMNS = ("video_id", "frame_index", "class", "y0", "x0", "y1", "x1")
CRF = 8
MIN_SIZE = 32
CENTRE_BAND = 0.05  # half-width of the labelled centre band, fraction of the fan width
LINE_SIGMA = 0.014  # pleura / A-line thickness, fraction of the depth
A_LINE_VISIBLE = 0.3  # A-line amplitude from which it counts as visible (masks, labels)

_ID = {name: i for i, name in enumerate(MASK_CLASSES)}


@dataclasses.dataclass(frozen=True)
class Patient:
  """Patient-specific appearance: probe geometry, depth, pleural depth, tissue, gain."""
  probe: str
  depth_cm: int
  half_angle: float      # radians
  apex_radius: float     # pixels from the virtual apex to the skin line
  top: float             # pixels from the image top to the skin line at the fan centre
  depth_px: int          # rows of the polar grid = fan depth in pixels
  lateral_px: int        # columns of the polar grid = arc length at 60% of the depth
  pleura: float          # pleural depth, fraction of the fan depth
  speckle_sigma: tuple   # axial, lateral speckle correlation length (pixels)
  attenuation: float     # echo *= exp(-attenuation * depth fraction)
  wall_level: float
  lung_level: float
  fascia: tuple          # ((depth as a fraction of the pleural depth, amplitude), ...)
  rib_spacing: float     # columns between rib centres
  rib_width: float       # columns
  gamma: float           # target histogram quantiles: lo + (hi - lo) * q**gamma
  hi: float
  lo: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """What one video shows; lateral positions are world columns (wall or lung frame)."""
  label: str
  pleura: float
  sweep: np.ndarray      # (F,) probe displacement, columns
  slide: np.ndarray      # (F,) lung displacement relative to the wall, columns
  rib_phase: float
  vessels: tuple         # ((centre depth, depth radius, centre column, column radius), ...)
  a_amp: float
  a_decay: float
  b_lines: tuple         # ((column, sigma, amplitude), ...)
  z_lines: tuple         # ((column, sigma, length, amplitude), ...)
  consolidation: tuple   # () or (column, half width, depth, shred (amps, freqs, phases) of its
                         # lower border, air-bronchogram dots ((depth, column), ...))
  gamma: float
  hi: float
  lo: float


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  """One video of the plan: identity, class and exam."""
  video_id: str
  patient_id: str
  patient_index: int
  video_index: int
  label: str
  exam: str
  side: str

  @property
  def path(self) -> str:
    return f"{self.label}/{self.video_id}.mp4"


@dataclasses.dataclass(frozen=True)
class Video:
  """A rendered video and its ground truth, in image pixels."""
  frames: np.ndarray     # uint8 (F, S, S)
  masks: np.ndarray      # uint8 (F, S, S) of MASK_CLASSES ids
  fan: np.ndarray        # bool (S, S): inside the fan
  markers: np.ndarray    # bool (S, S): burned-in text and ticks, all outside the fan
  boxes: tuple           # ((frame_index, class, y0, x0, y1, x1), ...)
  frame_labels: tuple    # ((frame_index, coarse, fine), ...) for labelled frames
  patient: Patient
  scene: Scene


def sample_patient(rng: np.random.Generator, size: int) -> Patient:
  """Draws a patient's appearance for frames of ``size`` x ``size`` pixels."""
  probe = str(rng.choice(sorted(PROBES)))
  half_angle = math.radians(rng.uniform(*PROBES[probe]))
  apex_radius = size * rng.uniform(0.3, 0.55)
  top = size * rng.uniform(0.03, 0.08)
  depth_px = int(round(size - top - size * rng.uniform(0.02, 0.05)))
  lateral_px = int(math.ceil(2 * half_angle * (apex_radius + 0.6 * depth_px)))
  fascia = tuple((float(rng.uniform(0.2, 0.85)), float(rng.uniform(0.3, 0.9)))
                 for _ in range(int(rng.integers(1, 4))))
  return Patient(
      probe=probe, depth_cm=int(rng.choice(DEPTHS_CM)), half_angle=half_angle,
      apex_radius=apex_radius, top=top, depth_px=depth_px, lateral_px=lateral_px,
      pleura=float(rng.uniform(0.15, 0.3)),
      speckle_sigma=(size / 128 * float(rng.uniform(1.2, 2.0)),
                     size / 128 * float(rng.uniform(2.0, 4.0))),
      attenuation=float(rng.uniform(0.5, 2.0)), wall_level=float(rng.uniform(0.45, 0.7)),
      lung_level=float(rng.uniform(0.25, 0.4)), fascia=fascia,
      rib_spacing=lateral_px * float(rng.uniform(0.5, 0.7)),
      rib_width=lateral_px * float(rng.uniform(0.08, 0.13)),
      gamma=float(rng.uniform(1.5, 4.0)), hi=float(rng.uniform(90.0, 255.0)),
      lo=float(rng.uniform(0.0, 15.0)))


def _periodic_dist(x, period):
  """Distance from x to the nearest multiple of ``period``."""
  m = np.mod(x, period)
  return np.minimum(m, period - m)


def _positions(rng, n, lo, hi, min_gap, allowed):
  """Up to n positions in [lo, hi], at least ``min_gap`` apart, where ``allowed(x)`` holds."""
  out = []
  for _ in range(200 * n):
    if len(out) == n:
      break
    x = float(rng.uniform(lo, hi))
    if allowed(x) and all(abs(x - o) >= min_gap for o in out):
      out.append(x)
  return tuple(out)


def _sample_consolidation(rng, patient, pleura, rib_phase, mid):
  """(column, half width, depth, shred (amps, freqs, phases), dots ((depth, column), ...)).

  The consolidation fits in the intercostal space nearest to a random point of the middle of
  the view (world columns).
  """
  nl, spacing = patient.lateral_px, patient.rib_spacing
  target = mid + nl * rng.uniform(0.3, 0.7)
  gap = rib_phase + spacing / 2 + spacing * np.round((target - rib_phase - spacing / 2) / spacing)
  room = (spacing - patient.rib_width) / 2 - 1
  half = min(nl * float(rng.uniform(0.12, 0.18)), 0.95 * room)
  centre = float(gap + rng.uniform(-1, 1) * (room - half))
  depth = float(min(rng.uniform(0.2, 0.4), 0.92 - pleura))
  n_terms = 4
  shred = (rng.uniform(0.3, 1.0, n_terms), rng.uniform(1.0, 4.0, n_terms),
           rng.uniform(0, 2 * np.pi, n_terms))
  n_dots = int(rng.integers(4, 9))
  dots = tuple(zip(rng.uniform(pleura + 0.03, pleura + 0.8 * depth, n_dots),
                   centre + rng.uniform(-0.7, 0.7, n_dots) * half))
  return (centre, half, depth, shred, dots)


def sample_scene(rng: np.random.Generator, patient: Patient, label: str, frames: int) -> Scene:
  """Draws what one video of class ``label`` shows, for a patient.

  The class-independent parts (histogram target, pleural depth, probe motion, ribs, vessels,
  Z-lines, A-lines, sliding) are drawn first, in the same order for every class, so one seed
  gives the same nuisances whatever the class; the pathology is drawn last.
  """
  if label not in CLASSES:
    raise ValueError(f"unknown class {label!r}; known: {CLASSES}")
  nl = patient.lateral_px
  gamma = patient.gamma * float(rng.uniform(0.85, 1.15))
  hi = min(255.0, patient.hi * float(rng.uniform(0.8, 1.2)))
  lo = patient.lo * float(rng.uniform(0.7, 1.3))
  pleura = patient.pleura * float(rng.uniform(0.95, 1.05))
  t = np.linspace(-1.0, 1.0, frames) if frames > 1 else np.zeros(1)
  drift = 0.5 * rng.uniform(0.1, 0.4) * patient.rib_spacing * rng.choice([-1, 1])
  sweep = drift * t + 0.01 * nl * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t
                                          + rng.uniform(0, 2 * np.pi))
  slide = rng.uniform(0.015, 0.04) * nl * np.sin(
      2 * np.pi * np.arange(frames) / rng.uniform(10, 24) + rng.uniform(0, 2 * np.pi))
  rib_phase = float(rng.uniform(0, patient.rib_spacing))
  mid = float(np.mean(sweep))

  def intercostal(x, margin):
    return _periodic_dist(x - rib_phase, patient.rib_spacing) > patient.rib_width / 2 + margin

  vessels = tuple((pleura * rng.uniform(0.35, 0.75), pleura * rng.uniform(0.12, 0.22),
                   nl * rng.uniform(0.1, 0.9) + mid, nl * rng.uniform(0.03, 0.06))
                  for _ in range(int(rng.integers(0, 3))))
  z_cols = _positions(rng, int(rng.integers(1, 5)), 0.1 * nl + mid, 0.9 * nl + mid, 0.05 * nl,
                      lambda x: intercostal(x, 2))
  z_lines = tuple((c, nl * float(rng.uniform(0.007, 0.011)), float(rng.uniform(0.08, 0.3)),
                   float(rng.uniform(0.7, 1.3))) for c in z_cols)
  a_amp, a_decay = float(rng.uniform(0.25, 1.2)), float(rng.uniform(0.5, 0.8))
  b_lines, consolidation = (), ()
  if label == "b_lines":
    sigma = nl * float(rng.uniform(0.007, 0.011))
    cols = _positions(rng, int(rng.integers(2, 5)), 0.1 * nl + mid, 0.9 * nl + mid, 4 * sigma,
                      lambda x: intercostal(x, 2 * sigma))
    b_lines = tuple((c, sigma, float(rng.uniform(0.7, 1.3))) for c in cols)
  elif label == "consolidation":
    slide = np.zeros(frames)
    consolidation = _sample_consolidation(rng, patient, pleura, rib_phase, mid)
  return Scene(label=label, pleura=pleura, sweep=sweep, slide=slide, rib_phase=rib_phase,
               vessels=vessels, a_amp=a_amp, a_decay=a_decay, b_lines=b_lines, z_lines=z_lines,
               consolidation=consolidation, gamma=gamma, hi=hi, lo=lo)


def speckle_field(rng: np.random.Generator, shape, sigma) -> np.ndarray:
  """Correlated Rayleigh speckle (magnitude of smoothed complex Gaussian noise), mean 1."""
  re = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
  im = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
  mag = np.hypot(re, im)
  return (mag / mag.mean()).astype(np.float32)


def _gauss(x, sigma):
  return np.exp(-0.5 * (x / sigma) ** 2)


def _wall_canvas(patient: Patient, scene: Scene, d, x):
  """Chest wall echo on the world canvas (D, X): tissue above the pleura, fascia, vessels."""
  p = scene.pleura
  above = d < p
  wall = np.where(above, patient.wall_level, 0.0)
  for frac, amp in patient.fascia:
    wall = wall + amp * _gauss(d - frac * p, 0.7 * LINE_SIGMA) * above
  for cy, ry, cx, rx in scene.vessels:
    wall = np.where(((d - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1, 0.15 * wall, wall)
  return wall


def _ribs(patient: Patient, scene: Scene, x):
  """(inside a rib (1, X), depth of the rib's bright surface (1, X)) on the world canvas."""
  dist = _periodic_dist(x - scene.rib_phase, patient.rib_spacing)
  half = patient.rib_width / 2
  surface = scene.pleura - 0.02 - 0.02 * (1 - np.clip(dist / half, 0, 1) ** 2)
  return dist < half, surface


def _consolidation_region(scene: Scene, d, x):
  """(inside (D, X), columns it covers (1, X), depth of its lower border (1, X))."""
  centre, half, depth, (amps, freqs, phases), _ = scene.consolidation
  u = (x - centre) / half
  uc = np.clip(u, -1, 1)
  shred = sum(a * np.sin(f * np.pi * uc + ph) for a, f, ph in zip(amps, freqs, phases))
  bottom = scene.pleura + depth * np.sqrt(1 - uc**2) * (1 + 0.3 * shred / np.sum(amps))
  covered = np.abs(u) < 1
  return covered & (d > scene.pleura + 0.5 * LINE_SIGMA) & (d < bottom), covered, bottom


def _lung_canvas(patient: Patient, scene: Scene, d, x):
  """Lung on the world canvas (D, X): (echo, B-line echo, labels, instance ids).

  Both echoes are before attenuation and speckle. Instance ids: 0 none, k > 0 the k-th entry
  of ``_instance_classes(scene)``.
  """
  p, sigma = scene.pleura, LINE_SIGMA
  below = d > p
  shape = np.broadcast_shapes(d.shape, x.shape)
  lung = np.where(below, patient.lung_level, 0.0)
  labels = np.zeros(shape, np.uint8)
  ids = np.zeros(shape, np.uint8)
  aerated = np.ones(x.shape, bool)
  pleura_amp = np.full(x.shape, 2.2)
  if scene.consolidation:
    cons, covered, bottom = _consolidation_region(scene, d, x)
    aerated = ~covered
    dots = sum(1.5 * _gauss(d - dy, 0.6 * sigma) * _gauss(x - dx, 0.012 * patient.lateral_px)
               for dy, dx in scene.consolidation[4])
    lung = np.where(cons, 0.1 + dots, lung + 0.9 * _gauss(d - bottom, 0.6 * sigma) * covered)
    pleura_amp = np.where(covered, 1.0, pleura_amp)
  b_lines = sum(amp * _gauss(x - c, s) for c, s, amp in scene.b_lines) * below
  z_lines = sum(amp * _gauss(x - c, s) * np.exp(-(d - p) / length)
                for c, s, length, amp in scene.z_lines) * below
  a_lines, a_seen = 0.0, np.zeros(d.shape, bool)
  for n in range(2, int(1 / p) + 1):
    amp = scene.a_amp * scene.a_decay ** (n - 2)
    a_lines = a_lines + amp * _gauss(d - n * p, sigma)
    a_seen |= (amp >= A_LINE_VISIBLE) & (np.abs(d - n * p) < 1.5 * sigma)
  erased = sum(_gauss(x - c, 1.5 * s) for c, s, _ in scene.b_lines)
  a_lines = a_lines * aerated * (1 - np.clip(erased, 0, 1))
  lung = lung + a_lines + z_lines + pleura_amp * _gauss(d - p, sigma)
  labels[np.broadcast_to(np.abs(d - p) < 1.5 * sigma, shape)] = _ID["pleural_line"]
  labels[np.broadcast_to(a_seen & below & aerated, shape)] = _ID["a_line"]
  for k, (c, s, _) in enumerate(scene.b_lines, start=1):
    core = np.broadcast_to((np.abs(x - c) < 1.5 * s) & (d > p + 1.5 * sigma), shape)
    labels[core] = _ID["b_line"]
    ids[core] = k
  if scene.consolidation:
    labels[cons] = _ID["consolidation"]
    ids[cons] = len(scene.b_lines) + 1
  return lung, b_lines, labels, ids


def _instance_classes(scene: Scene):
  """Mask class of each pathology instance id (1-based) of ``_lung_canvas``."""
  return ("b_line",) * len(scene.b_lines) + (("consolidation",) if scene.consolidation else ())


def render_polar(rng: np.random.Generator, patient: Patient, scene: Scene):
  """(echo (F, D, L) float32, labels (F, D, L) uint8, instance ids (F, D, L) uint8).

  Wall and lung are drawn once on world canvases wider than the view, then every frame views
  them through the probe's shift (wall) and the probe's plus the sliding shift (lung), whole
  columns. Labels are ``MASK_CLASSES`` ids; instance ids are 0 or 1 + the index into
  ``_instance_classes(scene)``, zero where a rib hides the instance. ``rng`` draws the speckle.
  """
  nd, nl = patient.depth_px, patient.lateral_px
  shift_w = np.round(scene.sweep).astype(np.int64)
  shift_l = np.round(scene.sweep + scene.slide).astype(np.int64)
  lo = min(shift_w.min(), shift_l.min())
  width = nl + max(shift_w.max(), shift_l.max()) - lo
  x = np.arange(width, dtype=np.float32)[None, :] + lo         # world column of each canvas column
  d = ((np.arange(nd) + 0.5) / nd).astype(np.float32)[:, None]
  atten = np.exp(-patient.attenuation * d)
  spk_w = speckle_field(rng, (nd, width), patient.speckle_sigma)
  spk_l = speckle_field(rng, (nd, width), patient.speckle_sigma)
  in_rib, surface = _ribs(patient, scene, x)
  wall = (_wall_canvas(patient, scene, d, x)
          + 2.0 * _gauss(d - surface, 0.7 * LINE_SIGMA) * in_rib) * atten * spk_w
  shadow = in_rib & (d > surface)
  hidden = in_rib & (d > surface - 1.5 * LINE_SIGMA)
  rib_label = hidden | (in_rib & (np.abs(d - surface) < 1.5 * LINE_SIGMA))
  lung, b_lines, labels, ids = _lung_canvas(patient, scene, d, x)
  lung = lung * atten * spk_l + b_lines * np.sqrt(atten) * (0.6 + 0.4 * spk_l)
  cols_w = (np.arange(nl)[None, :] + shift_w[:, None] - lo)      # (F, L) canvas columns
  cols_l = (np.arange(nl)[None, :] + shift_l[:, None] - lo)

  def view(canvas, cols):
    return np.moveaxis(canvas[:, cols], 1, 0)                    # (D, F, L) -> (F, D, L)

  shadow_v = view(shadow, cols_w)
  echo = (view(wall, cols_w) + view(lung, cols_l)) * np.where(shadow_v, 0.04, 1.0)
  echo = echo + 0.02 * view(spk_w, cols_w)
  labels_v = np.where(view(rib_label, cols_w), _ID["rib_shadow"], view(labels, cols_l))
  ids_v = np.where(view(hidden, cols_w), 0, view(ids, cols_l))
  return echo.astype(np.float32), labels_v.astype(np.uint8), ids_v.astype(np.uint8)


def fan_geometry(patient: Patient, size: int):
  """Scan conversion map: (inside-fan bool (S, S), flat polar index (S, S)) per image pixel."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  apex_y = patient.top - patient.apex_radius
  r = np.hypot(yy - apex_y, xx - size / 2)
  phi = np.arctan2(xx - size / 2, yy - apex_y)
  row = np.floor(r - patient.apex_radius).astype(np.int64)
  col = np.floor((phi + patient.half_angle) / (2 * patient.half_angle)
                 * patient.lateral_px).astype(np.int64)
  fan = (row >= 0) & (row < patient.depth_px) & (col >= 0) & (col < patient.lateral_px)
  return fan, np.where(fan, row * patient.lateral_px + col, 0)


def scan_convert(polar: np.ndarray, fan: np.ndarray, index: np.ndarray) -> np.ndarray:
  """(F, D, L) polar frames -> (F, S, S) image frames, zero outside the fan."""
  out = np.zeros((polar.shape[0],) + fan.shape, polar.dtype)
  out[:, fan] = polar.reshape(polar.shape[0], -1)[:, index[fan]]
  return out


def match_histogram(values: np.ndarray, gamma: float, hi: float, lo: float) -> np.ndarray:
  """Rank-maps each row of ``values`` (F, N) onto the quantiles lo + (hi - lo) * q**gamma.

  Every row gets exactly the same multiset of values, so the output histogram is independent
  of the content; the order of the pixels (the structure) is kept. ``values`` (echo, > 0) are
  ranked on a 16-bit log scale (a radix sort), ties in the order of the pixels.
  """
  n = values.shape[1]
  target = lo + (hi - lo) * ((np.arange(n) + 0.5) / n) ** gamma
  logv = np.log(np.maximum(values, 1e-12))
  lo_v, hi_v = logv.min(axis=1, keepdims=True), logv.max(axis=1, keepdims=True)
  keys = np.round((logv - lo_v) / np.maximum(hi_v - lo_v, 1e-12) * 65535).astype(np.uint16)
  out = np.empty(values.shape, np.float64)
  np.put_along_axis(out, np.argsort(keys, axis=1, kind="stable"),
                    np.broadcast_to(target, values.shape), axis=1)
  return out


def burned_in_markers(size: int, fan: np.ndarray, left: str, right: str) -> np.ndarray:
  """uint8 (S, S) overlay: text in the top corners, depth ticks at the right edge, none in the fan.

  Marker pixels keep a one-pixel gap to the fan, so the fan's edge stays clean.
  """
  img = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(img)
  font = ImageFont.load_default(size=max(8, size // 14))
  draw.multiline_text((1, 1), left, fill=230, font=font, spacing=1)
  width = draw.multiline_textbbox((0, 0), right, font=font, spacing=1)[2]
  draw.multiline_text((size - width - 2, 1), right, fill=230, font=font, spacing=1)
  tick = max(2, size // 64)
  for y in np.linspace(size * 0.1, size * 0.95, 5):
    draw.rectangle((size - tick, int(y), size - 1, int(y) + tick - 1), fill=200)
  out = np.asarray(img).copy()
  out[ndimage.binary_dilation(fan, iterations=1)] = 0
  return out


def frame_anatomy(labels: np.ndarray):
  """((frame, coarse, fine), ...) from polar label maps (F, D, L): the centre band's content."""
  nl = labels.shape[2]
  centre = np.abs(np.arange(nl) + 0.5 - nl / 2) < CENTRE_BAND * nl
  out = []
  for f, lab in enumerate(labels):
    band = lab[:, centre]
    rib = np.mean(band[-1] == _ID["rib_shadow"])
    if rib >= 0.75:
      out.append((f, "rib_shadow", "rib_shadow"))
    elif rib == 0:
      for mask_class, fine in (("consolidation", "consolidation"), ("b_line", "b_lines"),
                               ("a_line", "a_lines")):
        if np.any(band == _ID[mask_class]):
          break
      else:
        fine = "pleura_only"
      out.append((f, "pleura", fine))
  return tuple(out)


def instance_boxes(ids: np.ndarray, classes) -> tuple:
  """((frame, class, y0, x0, y1, x1), ...): the pixel bounding box (y1, x1 exclusive) of each
  instance id k (class ``classes[k - 1]``) in each frame of the id maps (F, S, S)."""
  out = []
  for k, name in enumerate(classes, start=1):
    m = ids == k
    rows, cols = m.any(axis=2), m.any(axis=1)
    for f in np.flatnonzero(rows.any(axis=1)):
      r, c = np.flatnonzero(rows[f]), np.flatnonzero(cols[f])
      out.append((int(f), name, int(r[0]), int(c[0]), int(r[-1]) + 1, int(c[-1]) + 1))
  return tuple(sorted(out))


def render_video(rng: np.random.Generator, patient: Patient, spec: VideoSpec, frames: int,
                 size: int) -> Video:
  """Renders one video of ``spec`` for ``patient``: frames, masks, boxes and frame labels."""
  scene = sample_scene(rng, patient, spec.label, frames)
  echo, labels, ids = render_polar(rng, patient, scene)
  fan, index = fan_geometry(patient, size)
  image = np.zeros((frames, size, size), np.uint8)
  pixels = echo.reshape(frames, -1)[:, index[fan]]
  image[:, fan] = np.round(match_histogram(pixels, scene.gamma, scene.hi, scene.lo))
  left = f"{patient.probe}\n{patient.depth_cm}cm"
  right = f"{spec.exam} {spec.side[0].upper()}\n{spec.video_id[-3:]}"
  markers = burned_in_markers(size, fan, left, right)
  boxes = instance_boxes(scan_convert(ids, fan, index), _instance_classes(scene))
  return Video(frames=np.maximum(image, markers[None]), masks=scan_convert(labels, fan, index),
               fan=fan, markers=markers > 0, boxes=boxes, frame_labels=frame_anatomy(labels),
               patient=patient, scene=scene)


def plan_videos(num_patients: int, videos_per_patient: int, seed: int) -> list:
  """VideoSpecs: classes balanced over patients in seeded order; video k of a patient is exam
  EXAMS[k % 3], and its side alternates between patients and between rounds of three exams."""
  classes = np.arange(num_patients) % len(CLASSES)
  np.random.default_rng([seed, 1]).shuffle(classes)
  return [VideoSpec(video_id=f"syn{p:03d}_v{k:02d}", patient_id=f"patient{p:03d}",
                    patient_index=p, video_index=k, label=CLASSES[classes[p]],
                    exam=EXAMS[k % len(EXAMS)], side=SIDES[(p + k // len(EXAMS)) % len(SIDES)])
          for p in range(num_patients) for k in range(videos_per_patient)]


def make_video(seed: int, spec: VideoSpec, frames: int, size: int) -> Video:
  """The video ``generate`` writes for ``spec``: depends only on (seed, patient, video index)."""
  patient = sample_patient(np.random.default_rng([seed, 2, spec.patient_index]), size)
  rng = np.random.default_rng([seed, 3, spec.patient_index, spec.video_index])
  return render_video(rng, patient, spec, frames, size)


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
  """uint8 (F, H, W) grayscale frames -> h264 mp4 bytes (yuv420p, crf CRF, one thread)."""
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.thread_count = 1
    stream.options = {"crf": str(CRF), "preset": "ultrafast"}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
    container.mux(stream.encode())
  return buf.getvalue()


def _write_bytes(path: str, data: bytes):
  with files_lib.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def _write_csv(path: str, columns, rows):
  out = io.StringIO()
  w = csv.writer(out)
  w.writerow(columns)
  w.writerows(rows)
  files_lib.write_text(path, out.getvalue(), newline="")


def _write_masks(path: str, masks: np.ndarray):
  with files_lib.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, masks=masks, class_names=np.array(MASK_CLASSES))


def _check_args(num_patients, videos_per_patient, frames, size, seed, fps):
  for name, value in (("num_patients", num_patients), ("videos_per_patient", videos_per_patient),
                      ("frames", frames), ("fps", fps)):
    if int(value) != value or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if int(size) != size or size < MIN_SIZE or size % 2:
    raise ValueError(f"size must be an even integer >= {MIN_SIZE} (h264 yuv420p), got {size!r}")


def generate(output: str, num_patients: int = 40, videos_per_patient: int = 3, frames: int = 16,
             size: int = 128, seed: int = 0, fps: int = 20) -> str:
  """Writes the synthetic dataset (see the module docstring) under ``output``.

  Returns the path of manifest.csv. Existing files of the same names are replaced.
  """
  _check_args(num_patients, videos_per_patient, frames, size, seed, fps)
  for sub in CLASSES + ("masks",):
    os.makedirs(os.path.join(output, sub), exist_ok=True)
  manifest, frame_rows, box_rows = [], [], []
  for spec in plan_videos(num_patients, videos_per_patient, seed):
    video = make_video(seed, spec, frames, size)
    _write_bytes(os.path.join(output, spec.path), encode_mp4(video.frames, fps))
    _write_masks(os.path.join(output, "masks", f"{spec.video_id}.npz"), video.masks)
    manifest.append((spec.path, spec.video_id, spec.patient_id, spec.label, spec.exam, spec.side,
                     video.patient.probe, video.patient.depth_cm))
    frame_rows += [(spec.video_id,) + row for row in video.frame_labels]
    box_rows += [(spec.video_id,) + row for row in video.boxes]
  _write_csv(os.path.join(output, "frame_labels.csv"), FRAME_LABEL_COLUMNS, frame_rows)
  _write_csv(os.path.join(output, "boxes.csv"), BOX_COLUMNS, box_rows)
  manifest_path = os.path.join(output, "manifest.csv")
  _write_csv(manifest_path, MANIFEST_COLUMNS, manifest)
  return manifest_path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--num_patients", type=int, default=40)
  parser.add_argument("--videos_per_patient", type=int, default=3)
  parser.add_argument("--frames", type=int, default=16, help="frames per video")
  parser.add_argument("--size", type=int, default=128, help="frame height = width, even")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--fps", type=int, default=20)
  args = parser.parse_args(argv)
  try:
    path = generate(args.output, args.num_patients, args.videos_per_patient, args.frames,
                    args.size, args.seed, args.fps)
  except ValueError as e:
    parser.error(str(e))
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
