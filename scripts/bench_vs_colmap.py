#!/usr/bin/env python3
"""Issue 14: our CLI side by side with COLMAP's automatic reconstructor, same clip and quality.

Three systems, run alternating (ours, preset, cli, ours, preset, cli, ...) for ``--pairs`` rounds
per clip x quality, each in a fresh child process and a fresh temporary folder:

``ours``
    ``python -m colmap_pipeline reconstruct VIDEO OUT --quality Q`` (argv list, no shell). Stage
    split: ``timings_s`` of the JSON it prints (= ``OUT/result.json``).
``preset``
    COLMAP's ``automatic_reconstructor --data_type video --quality low|medium`` reproduced with
    the same pycolmap as ours (this script re-run as a child, ``_preset``): N evenly spaced frames
    (N = our frame cap, :data:`colmap_pipeline.presets.DEFAULT_FRAME_CAPS`: 30 / 50) decoded
    with OpenCV and written as JPEG quality 95; SIFT at ``max_image_size`` 1000 / 1600 with 2048 /
    4096 features, one shared SIMPLE_RADIAL camera; sequential matching with overlap 10
    (pycolmap's defaults otherwise: quadratic overlap, no loop detection); incremental mapping on
    all cores with the mapper options of ``OptionManager::ModifyForVideoData`` and
    ``ModifyForLowQuality`` / ``ModifyForMediumQuality`` (COLMAP
    ``src/colmap/controllers/option_manager.cc``; the BA iteration counts are COLMAP 3.8's
    defaults 25 / 50 divided as there); the model with the most registered images. Each step
    is timed in the child.
``cli``
    The Debian COLMAP 3.8 binary (``apt-get install colmap``, CPU build): the same frames are
    written by a child (``_frames``, timed as its ``frames`` stage), then ``colmap
    automatic_reconstructor --workspace_path W --image_path I --data_type video --quality Q
    --single_camera 1 --use_gpu 0 --dense 0``; its stage split is parsed from the ``Elapsed time:
    X [minutes]`` lines of its log (0.06 s resolution); the largest model of ``W/sparse/*`` is
    read with pycolmap. Note: COLMAP 3.8's sequential matcher matches every image with the next
    10 *and* the ones 2**k ahead (about twice the pairs of pycolmap 4.2.1's quadratic overlap,
    which keeps only the distances 1, 2, 4, 8, ...).

Per run: wall time (parent's monotonic clock around the child, interpreter start included),
stage split (s), registered / selected frames, 3D points, mean reprojection error (px), the
camera's focal length (px), peak RSS of the process tree (``/proc`` of the child and its
descendants polled every 0.1 s, RSS summed, maximum kept; ``ru_maxrss`` of the child from
``wait4`` is kept beside it as a cross-check: the largest single process), CPU seconds (user +
system of the child and its reaped descendants, from ``wait4``: less sensitive to a shared
machine's load than the wall time), and the 1/5/15-minute
load average before and after. At the end: a Markdown table per clip x quality x system (median
and min-max of the wall time, median per stage, ours / peer = ratio of the medians) and, with
``--json``, the raw numbers.

Usage::

    nice -n 10 .venv/bin/python scripts/bench_vs_colmap.py --pairs 1 --clips sample --qualities low
    .venv/bin/python scripts/bench_vs_colmap.py --json /tmp/bench_vs_colmap.json  # full run

Clips: ``sample`` = ``samples/max-heromode.mp4``, ``karma`` =
``../shared/data/gopro_karma_drone/karma.mp4`` (absent: skipped with a message).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from colmap_pipeline.presets import DEFAULT_FRAME_CAPS  # noqa: E402  (light leaf, no pycolmap)

CLIPS = {"sample": REPO / "samples" / "max-heromode.mp4",
         "karma": REPO.parent / "shared" / "data" / "gopro_karma_drone" / "karma.mp4"}
SYSTEMS = ("ours", "preset", "cli")
STAGE_KEYS = ("frames", "features", "matching", "mapping", "export")
#: COLMAP automatic reconstructor quality -> (SIFT max_image_size px, max_num_features, BA
#: iteration divisor, global-BA growth-ratio factor): ``ModifyForLowQuality`` /
#: ``ModifyForMediumQuality`` in COLMAP's option_manager.cc.
COLMAP_QUALITY = {"low": (1000, 2048, 2.0, 1.2), "medium": (1600, 4096, 1.5, 1.1)}
#: COLMAP 3.8 defaults of ``Mapper.ba_local_max_num_iterations`` / ``ba_global_max_num_iterations``
COLMAP38_BA_ITERATIONS = (25, 50)
JPEG_QUALITY = 95
SEQUENTIAL_OVERLAP = 10
POLL_S = 0.1
COLMAP_BIN = "colmap"
MIB = 1024 * 1024


@dataclass
class Measured:
    """One child process tree: wall time (s), exit status, peak RSS of the tree (bytes, polled)
    and the child's own ``ru_maxrss`` (bytes, from ``wait4``: largest single process)."""

    wall_s: float
    returncode: int
    peak_tree_rss: int
    ru_maxrss: int
    cpu_s: float = 0.0


@dataclass
class RunResult:
    """One run of one system; times in s, RSS in MiB, reprojection error in px."""

    system: str
    clip: str
    quality: str
    pair: int
    ok: bool = False
    error: str | None = None
    wall_s: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    registered: int = 0
    frames: int = 0
    points3d: int = 0
    reproj_px: float | None = None
    focal_px: float | None = None
    peak_rss_mib: float = 0.0
    ru_maxrss_mib: float = 0.0
    cpu_s: float = 0.0
    rss_method: str = "sum of RSS over /proc of the child and its descendants, polled every 0.1 s"
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)


# --- measuring a process tree ------------------------------------------------------------------

def _parent_pids() -> dict[int, int]:
    """``{pid: parent pid}`` of every process in ``/proc`` (vanishing ones skipped)."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state, ppid, ...
        out[int(entry.name)] = int(fields[1])
    return out


def tree_rss_bytes(root: int) -> int:
    """Sum of the resident set sizes (bytes) of ``root`` and all its descendants, from
    ``/proc/PID/statm`` (field 2, pages). Processes that exit while being read count as 0."""
    parents = _parent_pids()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_measured(argv: list[str], log_path: Path, cwd: Path = REPO,
                 env: dict[str, str] | None = None) -> Measured:
    """Run ``argv`` (no shell) with stdout + stderr to ``log_path``; poll the tree's RSS every
    :data:`POLL_S` s from a thread; reap with ``wait4`` for the child's ``ru_maxrss``."""
    peak = [0]
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
                done.wait(POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(wall_s=wall, returncode=proc.returncode, peak_tree_rss=peak[0],
                    ru_maxrss=usage.ru_maxrss * 1024,  # Linux: ru_maxrss in KiB
                    cpu_s=usage.ru_utime + usage.ru_stime)


def _apply(res: RunResult, m: Measured) -> None:
    res.wall_s = round(m.wall_s, 2)
    res.peak_rss_mib = round(m.peak_tree_rss / MIB, 1)
    res.ru_maxrss_mib = max(res.ru_maxrss_mib, round(m.ru_maxrss / MIB, 1))
    res.cpu_s = round(res.cpu_s + m.cpu_s, 2)


def _tail(path: Path, chars: int = 400) -> str:
    return path.read_text(errors="replace")[-chars:].strip()


# --- the three systems (parent side) -----------------------------------------------------------

def run_ours(video: Path, quality: str, work: Path, res: RunResult) -> None:
    """Our CLI on ``video``; fills ``res`` from the JSON it prints (``timings_s`` = stages)."""
    out = work / "ours"
    m = run_measured([sys.executable, "-m", "colmap_pipeline", "reconstruct", str(video),
                      str(out), "--quality", quality], work / "ours.log")
    _apply(res, m)
    result_path = out / "result.json"
    if m.returncode != 0 or not result_path.exists():
        res.error = f"exit {m.returncode}: {_tail(work / 'ours.log')}"
        return
    r = json.loads(result_path.read_text())
    timings = r.get("timings_s") or {}
    res.stages = {k: round(float(v), 2) for k, v in timings.items()
                  if v is not None and k != "total"}
    cam = r.get("camera") or {}
    res.focal_px = _focal((cam.get("params") or {}).values())
    res.ok, res.registered, res.points3d = True, int(r["registered_images"]), int(r["points3d"])
    res.frames = int(r.get("frames_used") or r["frames_extracted"])
    res.reproj_px = float(r["mean_reprojection_error_px"])


def run_preset(video: Path, quality: str, work: Path, res: RunResult) -> None:
    """The pycolmap reproduction of COLMAP's preset, in a child (``_preset``)."""
    out = work / "preset.json"
    m = run_measured([sys.executable, str(Path(__file__).resolve()), "_preset", str(video),
                      str(work / "preset"), quality, str(out)], work / "preset.log")
    _apply(res, m)
    if m.returncode != 0 or not out.exists():
        res.error = f"exit {m.returncode}: {_tail(work / 'preset.log')}"
        return
    r = json.loads(out.read_text())
    res.stages = r["stages"]
    _fill_model(res, r["model"], r["frames"])


def run_cli(video: Path, quality: str, work: Path, res: RunResult) -> None:
    """Frames written by a child (``_frames``), then Debian's ``colmap automatic_reconstructor``."""
    images, ws, frames_json = work / "cli_images", work / "cli_ws", work / "cli_frames.json"
    ws.mkdir(parents=True)  # COLMAP 3.8 aborts (CHECK) on a missing workspace folder
    mf = run_measured([sys.executable, str(Path(__file__).resolve()), "_frames", str(video),
                       str(images), str(DEFAULT_FRAME_CAPS[quality]), str(frames_json)],
                      work / "cli_frames.log")
    if mf.returncode != 0 or not frames_json.exists():
        _apply(res, mf)
        res.error = f"frames: exit {mf.returncode}: {_tail(work / 'cli_frames.log')}"
        return
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    m = run_measured([COLMAP_BIN, "automatic_reconstructor", "--workspace_path", str(ws),
                      "--image_path", str(images), "--data_type", "video", "--quality", quality,
                      "--single_camera", "1", "--use_gpu", "0", "--dense", "0"],
                     work / "cli.log", env=env)
    _apply(res, m)
    res.cpu_s = round(res.cpu_s + mf.cpu_s, 2)
    res.wall_s = round(mf.wall_s + m.wall_s, 2)
    res.peak_rss_mib = round(max(mf.peak_tree_rss, m.peak_tree_rss) / MIB, 1)
    res.stages = {"frames": round(mf.wall_s, 2), **parse_colmap_log(work / "cli.log")}
    frames = len(json.loads(frames_json.read_text())["names"])
    if m.returncode != 0:
        res.error = f"colmap exit {m.returncode}: {_tail(work / 'cli.log')}"
        return
    _fill_model(res, largest_model(ws / "sparse"), frames)


_RULE = re.compile(r"^={20,}\s*$")
_ELAPSED = re.compile(r"^Elapsed time:\s*([0-9.]+)\s*\[minutes\]")


def parse_colmap_log(path: Path) -> dict[str, float]:
    """Stage split (s) of a COLMAP 3.8 ``automatic_reconstructor`` log: each ``Elapsed time: X
    [minutes]`` line is added to the stage of the last section heading (the line between two
    rules of ``=``): ``Feature extraction`` -> features, ``... feature matching`` -> matching,
    anything else (database loading, the mapper's sections) -> mapping."""
    stages: dict[str, float] = {}
    lines = path.read_text(errors="replace").splitlines()
    heading = ""
    for i, line in enumerate(lines):
        if (_RULE.match(line) and i + 2 < len(lines) and _RULE.match(lines[i + 2])
                and lines[i + 1].strip()):
            heading = lines[i + 1].strip().lower()
            continue
        m = _ELAPSED.match(line)
        if m:
            key = ("features" if "extraction" in heading else
                   "matching" if "matching" in heading else "mapping")
            stages[key] = round(stages.get(key, 0.0) + 60.0 * float(m.group(1)), 2)
    return stages


def _focal(params: Any) -> float | None:
    vals = [float(v) for v in params]
    return round(vals[0], 1) if vals else None


def _fill_model(res: RunResult, model: dict[str, Any] | None, frames: int) -> None:
    res.frames = frames
    if not model:
        res.error = "no model"
        return
    res.ok = True
    res.registered, res.points3d = model["registered"], model["points3d"]
    res.reproj_px, res.focal_px = model["reproj_px"], model["focal_px"]


def largest_model(sparse_dir: Path) -> dict[str, Any] | None:
    """``{registered, points3d, reproj_px, focal_px}`` of the model with the most registered
    images among ``sparse_dir/*`` (COLMAP binary models), or None when there is none."""
    import pycolmap

    best: dict[str, Any] | None = None
    for sub in sorted(p for p in sparse_dir.glob("*") if p.is_dir()) if sparse_dir.is_dir() else []:
        s = model_stats(pycolmap.Reconstruction(str(sub)))
        if best is None or s["registered"] > best["registered"]:
            best = s
    return best


def model_stats(rec: Any) -> dict[str, Any]:
    """Counts of a ``pycolmap.Reconstruction``: registered images, 3D points, mean reprojection
    error (px, 4 decimals) and the first camera's focal length (px)."""
    cams = list(rec.cameras.values())
    return {"registered": int(rec.num_reg_images()), "points3d": int(rec.num_points3D()),
            "reproj_px": round(float(rec.compute_mean_reprojection_error()), 4),
            "focal_px": _focal(cams[0].params[:1]) if cams else None}


# --- child side --------------------------------------------------------------------------------

def extract_frames(video: Path, count: int, out_dir: Path) -> list[str]:
    """Decode ``video`` with OpenCV and write ``count`` evenly spaced frames (indices
    ``round(linspace(0, n - 1, count))`` of its n frames) as JPEG quality 95, named
    ``frame_00000.jpg``, ... in time order. Returns the names. Raises RuntimeError when the
    video cannot be opened."""
    import cv2
    import numpy as np

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise RuntimeError(f"OpenCV cannot open {video}")
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    wanted = set(np.round(np.linspace(0, max(n - 1, 0), count)).astype(int).tolist())
    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    index = 0
    while cap.grab():
        if index in wanted:
            ok, frame = cap.retrieve()
            if ok:
                name = f"frame_{len(names):05d}.jpg"
                cv2.imwrite(str(out_dir / name), frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                names.append(name)
        index += 1
    cap.release()
    return names


def preset_mapper_options(quality: str) -> Any:
    """``pycolmap.IncrementalPipelineOptions`` as COLMAP's automatic reconstructor sets them for
    video at ``quality``: ``ModifyForVideoData`` (init_min_tri_angle / 2, global-BA growth ratios
    1.4, focal-length ratio 0.1-10, no limit on extra parameters) then ``ModifyForLowQuality`` /
    ``ModifyForMediumQuality`` (BA iterations / 2 or / 1.5, growth ratios x 1.2 or x 1.1, 2
    global-BA refinements); all cores."""
    import pycolmap

    _, _, divisor, ratio = COLMAP_QUALITY[quality]
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = opts.mapper.num_threads = -1
    opts.mapper.init_min_tri_angle /= 2
    opts.min_focal_length_ratio, opts.max_focal_length_ratio = 0.1, 10.0
    opts.max_extra_param = sys.float_info.max
    opts.ba_global_frames_ratio = opts.ba_global_points_ratio = 1.4 * ratio
    opts.ba_local_max_num_iterations = int(COLMAP38_BA_ITERATIONS[0] / divisor)
    opts.ba_global_max_num_iterations = int(COLMAP38_BA_ITERATIONS[1] / divisor)
    opts.ba_global_max_refinements = 2
    return opts


def preset_child(video: Path, work: Path, quality: str) -> dict[str, Any]:
    """Run the preset (see the module docstring) in this process; returns ``{stages: {frames,
    features, matching, mapping} (s), frames, model: largest_model-like dict or None}``."""
    stages: dict[str, float] = {}
    t = time.monotonic()
    images, db = work / "images", work / "database.db"
    names = extract_frames(video, DEFAULT_FRAME_CAPS[quality], images)
    stages["frames"] = time.monotonic() - t
    import pycolmap

    size, feats, _, _ = COLMAP_QUALITY[quality]
    t = time.monotonic()
    ext = pycolmap.FeatureExtractionOptions()
    ext.max_image_size, ext.sift.max_num_features = size, feats
    ext.num_threads, ext.use_gpu = -1, False
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "SIMPLE_RADIAL"
    pycolmap.extract_features(db, images, camera_mode=pycolmap.CameraMode.SINGLE,
                              reader_options=reader, extraction_options=ext,
                              device=pycolmap.Device.cpu)
    stages["features"] = time.monotonic() - t
    t = time.monotonic()
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads, matching.use_gpu = -1, False
    pairing = pycolmap.SequentialPairingOptions()
    pairing.overlap = SEQUENTIAL_OVERLAP
    pycolmap.match_sequential(db, matching_options=matching, pairing_options=pairing,
                              device=pycolmap.Device.cpu)
    stages["matching"] = time.monotonic() - t
    t = time.monotonic()
    models = pycolmap.incremental_mapping(db, images, work / "sparse",
                                          options=preset_mapper_options(quality)) or {}
    stages["mapping"] = time.monotonic() - t
    best = max(models.values(), key=lambda r: r.num_reg_images(), default=None)
    return {"stages": {k: round(v, 2) for k, v in stages.items()}, "frames": len(names),
            "model": model_stats(best) if best is not None else None}


def _child_main(argv: list[str]) -> int:
    """``_preset VIDEO WORK QUALITY OUT_JSON`` or ``_frames VIDEO OUT_DIR COUNT OUT_JSON``."""
    cmd, video, target, arg, out = argv
    if cmd == "_preset":
        Path(target).mkdir(parents=True, exist_ok=True)
        result = preset_child(Path(video), Path(target), arg)
    else:
        result = {"names": extract_frames(Path(video), int(arg), Path(target))}
    Path(out).write_text(json.dumps(result))
    return 0


# --- orchestration and report ------------------------------------------------------------------

RUNNERS = {"ours": run_ours, "preset": run_preset, "cli": run_cli}


def run_one(system: str, clip: str, video: Path, quality: str, pair: int,
            keep: bool) -> RunResult:
    """One run of ``system`` in a fresh temporary folder (removed unless ``keep``), with the
    load average before and after; prints one JSON line."""
    res = RunResult(system=system, clip=clip, quality=quality, pair=pair)
    work = Path(tempfile.mkdtemp(prefix=f"bench14_{system}_{clip}_{quality}_"))
    res.load_before = os.getloadavg()
    print(f"# {clip}/{quality} pair {pair} {system}: load before "
          f"{' '.join(f'{x:.2f}' for x in res.load_before)}", file=sys.stderr, flush=True)
    try:
        RUNNERS[system](video, quality, work, res)
    except Exception as exc:  # noqa: BLE001 - a failing system is a row, not the end of the run
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        if keep:
            print(f"# kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    res.load_after = os.getloadavg()
    print(f"# {clip}/{quality} pair {pair} {system}: load after "
          f"{' '.join(f'{x:.2f}' for x in res.load_after)}", file=sys.stderr, flush=True)
    print(json.dumps(asdict(res)), flush=True)
    return res


def _med(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarize_group(rs: list[RunResult]) -> dict[str, Any]:
    """Summary of the runs of one clip x quality x system: median / min / max wall time (s),
    median per stage (s), median registered, selected frames, points, reprojection error (px),
    focal length (px), peak RSS (MiB), the range of the 1-minute load average, the errors."""
    ok = [r for r in rs if r.ok]
    walls = [r.wall_s for r in ok]
    names = [k for k in (*STAGE_KEYS, "dense", "meshing") if any(k in r.stages for r in ok)]
    loads = [x for r in rs for x in (r.load_before[0], r.load_after[0])]
    return {
        "clip": rs[0].clip, "quality": rs[0].quality, "system": rs[0].system,
        "runs": len(rs), "ok": len(ok), "wall_median_s": _med(walls),
        "cpu_median_s": _med([r.cpu_s for r in ok]),
        "wall_min_s": min(walls, default=None), "wall_max_s": max(walls, default=None),
        "stages_median_s": {k: _med([r.stages[k] for r in ok if k in r.stages]) for k in names},
        "registered": _med([r.registered for r in ok]), "frames": _med([r.frames for r in ok]),
        "points3d": _med([r.points3d for r in ok]),
        "reproj_px": _med([r.reproj_px for r in ok if r.reproj_px is not None]),
        "focal_px": _med([r.focal_px for r in ok if r.focal_px is not None]),
        "peak_rss_mib": _med([r.peak_rss_mib for r in ok]),
        "ru_maxrss_mib": _med([r.ru_maxrss_mib for r in ok]),
        "load1_min": round(min(loads), 2), "load1_max": round(max(loads), 2),
        "errors": [r.error for r in rs if r.error]}


def summarize(rows: list[RunResult]) -> list[dict[str, Any]]:
    """:func:`summarize_group` per clip x quality x system, each with ``ours_over_this`` = our
    median wall time / this system's median wall time (None when either is missing)."""
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in rows:
        groups.setdefault((r.clip, r.quality, r.system), []).append(r)
    out = [summarize_group(rs) for rs in groups.values()]
    ours_wall: dict[tuple[str, str], float | None] = {
        (s["clip"], s["quality"]): s["wall_median_s"] for s in out if s["system"] == "ours"}
    for s in out:
        mine = ours_wall.get((s["clip"], s["quality"]))
        s["ours_over_this"] = (round(mine / s["wall_median_s"], 2)
                               if mine and s["wall_median_s"] else None)
    return out


def _fmt(v: Any, spec: str = "") -> str:
    return "–" if v is None else format(v, spec)


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The summaries as a Markdown table (one row per clip x quality x system)."""
    lines = ["| clip | quality | system | wall s median (min-max) | frames / SIFT / matching / "
             "mapping / export s | registered / selected | points | reproj px | f px | "
             "peak RSS MiB (tree) | ours ÷ this | CPU s | load 1-min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        st = s["stages_median_s"]
        split = " / ".join(_fmt(st.get(k)) for k in STAGE_KEYS)
        wall = (f"{_fmt(s['wall_median_s'])} ({_fmt(s['wall_min_s'])}-{_fmt(s['wall_max_s'])})"
                if s["ok"] else f"FAILED: {'; '.join(e[:80] for e in s['errors'])}")
        lines.append(
            f"| {s['clip']} | {s['quality']} | {s['system']} | {wall} | {split} | "
            f"{_fmt(s['registered'], '.0f')} / {_fmt(s['frames'], '.0f')} | "
            f"{_fmt(s['points3d'], '.0f')} | {_fmt(s['reproj_px'], '.3f')} | "
            f"{_fmt(s['focal_px'], '.0f')} | {_fmt(s['peak_rss_mib'], '.0f')} | "
            f"{_fmt(s['ours_over_this'], '.2f')} | {_fmt(s.get('cpu_median_s'), '.1f')} | "
            f"{s['load1_min']:.1f}-{s['load1_max']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="rounds of the three systems (3)")
    ap.add_argument("--clips", default="sample,karma", help="subset of: " + ",".join(CLIPS))
    ap.add_argument("--qualities", default="low,medium", help="subset of: low,medium")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="subset of: ours,preset,cli")
    ap.add_argument("--json", type=Path, default=None, help="write raw runs + summary here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folders")
    args = ap.parse_args(argv)
    for name, allowed in (("clips", CLIPS), ("qualities", COLMAP_QUALITY), ("systems", SYSTEMS)):
        bad = [v for v in getattr(args, name).split(",") if v not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when every run produced a model, 1 otherwise."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_preset", "_frames"):
        return _child_main(argv)
    args = parse_args(argv)
    if "cli" in args.systems and shutil.which(COLMAP_BIN) is None:
        print("colmap not found: apt-get install -y colmap (or --systems ours,preset)",
              file=sys.stderr)
        return 2
    rows: list[RunResult] = []
    for clip in args.clips.split(","):
        if not CLIPS[clip].exists():
            print(f"# {clip}: {CLIPS[clip]} absent, skipped", file=sys.stderr)
            continue
        for quality in args.qualities.split(","):
            for pair in range(1, args.pairs + 1):
                rows += [run_one(system, clip, CLIPS[clip], quality, pair, args.keep)
                         for system in args.systems.split(",")]
    summary = summarize(rows)
    print("\n" + markdown_table(summary))
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in rows], "summary": summary,
                                         "nproc": os.cpu_count()}, indent=1))
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
