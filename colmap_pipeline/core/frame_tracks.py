"""Frame reading and LK tracking shared by the frame selection and the clip checks.

Owns :class:`FrameTracks` (each kept frame read and tracked once for both clip checks),
the motion check's running state (:class:`Segments`), and the work done ahead while the frame
selection decodes: the motion check's reads and steps (:class:`MotionLookAhead`) and the
near-duplicate test's corners and motion per window candidate (:class:`Candidate`,
:func:`look_ahead`). The checks themselves: :mod:`.clip_checks`; the selection:
:mod:`.frame_select`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from .tracks import (
    MOTION_LOST_FRACTION,
    MOTION_MAX_CORNERS,
    MOTION_MIN_CORNERS,
    corners,
    load_gray,
    track,
    track_median,
)

if TYPE_CHECKING:  # frame_select imports this module
    from .frame_select import FramesResult, ScoreRecord

log = logging.getLogger(__name__)

#: When fewer than this fraction of an anchor's tracks survive, re-detect corners in the
#: current frame (start a new segment) and count the segment's motion.
MOTION_RESEED_FRACTION = 0.5
#: Corners tracked for the near-duplicate test (LK costs ~38 ms per candidate at 480 px with
#: 400 corners). Tried 100: GoPro at cap 100 then kept 89-93 instead of 98-100 (noisier median).
NEAR_DUPLICATE_CORNERS = MOTION_MAX_CORNERS


class FrameTracks:
    """The kept frames as the clip checks see them, shared by
    :func:`.clip_checks.measure_motion` and :func:`.clip_checks.measure_parallax` so that one
    :func:`.clip_checks.diagnose` reads and tracks each frame once.

    * :meth:`gray`: the frame read once (:func:`.tracks.load_gray`: gray uint8, long side
      ``MOTION_MAX_SIDE``) and kept (30-100 small images: 0.2 MiB each at 640 x 362).
    * :meth:`corners` and :meth:`track`: :func:`.tracks.corners` / :func:`.tracks.track`
      memoised on (frame indices, exact point coordinates). Both checks follow corners frame to
      frame from the same anchors and re-detect them on the same frames until the parallax
      check reaches its baseline, so that stretch is tracked once, with results identical to
      tracking it twice (measured: 58 -> 29-34 LK steps on the GoPro clips at 30 frames).

    Raises:
        OSError: (from :meth:`gray`) an image cannot be read.
    """

    def __init__(self, frame_paths: Iterable[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in frame_paths]
        self._grays: dict[int, tuple[np.ndarray, float]] = {}
        self._corners: dict[int, np.ndarray] = {}
        self._tracks: dict[tuple[int, int, bytes], tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def gray(self, i: int) -> tuple[np.ndarray, float]:
        """Frame ``i`` as :func:`.tracks.load_gray` returns it: (gray image, scale <= 1)."""
        got = self._grays.get(i)
        if got is None:
            got = self._grays[i] = load_gray(self.paths[i])
        return got

    def corners(self, i: int) -> np.ndarray:
        """Shi-Tomasi corners of frame ``i`` (N x 1 x 2 float32; do not modify)."""
        got = self._corners.get(i)
        if got is None:
            got = self._corners[i] = corners(self.gray(i)[0])
        return got

    def track(self, i: int, j: int, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:func:`.tracks.track` of ``pts`` from frame ``i`` to frame ``j``: (points in ``j``,
        ok mask); the arrays are shared between callers (do not modify)."""
        key = (i, j, np.ascontiguousarray(pts, np.float32).tobytes())
        got = self._tracks.get(key)
        if got is None:
            got = self._tracks[key] = track(self.gray(i)[0], self.gray(j)[0], pts)
        return got


@dataclass
class Segments:
    """Running state of :func:`.clip_checks.measure_motion` over the frames after the first."""

    scale: float
    anchor: np.ndarray
    cur: np.ndarray
    n_anchor: int
    seg_max: float = 0.0
    accumulated: float = 0.0
    max_median: float = 0.0
    segments: int = 1
    lost: int = 0
    first_segment: bool = True
    first_to_last: float | None = None

    def step(self, frames: FrameTracks, i: int, is_last: bool) -> None:
        """Track the surviving corners from frame ``i - 1`` to frame ``i``; re-seed when too few
        survive."""
        nxt, ok = frames.track(i - 1, i, self.cur)
        if len(self.cur) and ok.mean() < MOTION_LOST_FRACTION:
            self.lost += 1
        self.anchor, self.cur = self.anchor[ok], nxt[ok]
        if len(self.cur):
            d = np.linalg.norm((self.cur - self.anchor).reshape(-1, 2), axis=1)
            med = float(np.median(d)) / self.scale
            self.seg_max = max(self.seg_max, med)
            self.max_median = max(self.max_median, med)
            if self.first_segment and is_last:
                self.first_to_last = round(med, 3)
        if len(self.cur) < max(MOTION_MIN_CORNERS, MOTION_RESEED_FRACTION * self.n_anchor):
            self.accumulated += self.seg_max
            self.seg_max, self.first_segment = 0.0, False
            self.anchor = frames.corners(i)
            self.cur, self.n_anchor = self.anchor.copy(), len(self.anchor)
            if not is_last:
                self.segments += 1


class MotionLookAhead:
    """:func:`.clip_checks.measure_motion`'s reads and tracking done ahead, one candidate frame
    at a time, while the frame selection is still decoding (on its helper thread,
    :func:`.frame_select.extract_frames`), on the bet that every candidate is kept (the usual
    case: no blurry window, no near-duplicate).

    :meth:`add` takes the candidates in time order and runs the motion check's step to each
    one into a :class:`FrameTracks`; :meth:`tracks_for` hands that over to
    :func:`.clip_checks.diagnose` when the kept frames are exactly those candidates, where
    :func:`.clip_checks.measure_motion` (and :func:`.clip_checks.measure_parallax` where it
    follows the same tracks) then find every read and tracking step done, with the same
    numbers. Otherwise the work is dropped and the checks run as without it. Not thread-safe:
    one thread calls :meth:`add` and :meth:`restart`.
    """

    def __init__(self) -> None:
        self.frames = FrameTracks(())
        self._run: Segments | None = None
        self._stopped = False

    def restart(self) -> None:
        """Forget the candidates so far (a new decode pass starts over)."""
        self.frames, self._run, self._stopped = FrameTracks(()), None, False

    def add(self, path: str | os.PathLike) -> None:
        """The next candidate, written at ``path``: read it and track to it. Never raises: an
        error (e.g. the file already removed) stops looking ahead."""
        self.frames.paths.append(Path(path))
        if self._stopped:
            return
        i = len(self.frames) - 1
        try:
            if i == 0:
                scale = self.frames.gray(0)[1]
                anchor = self.frames.corners(0)
                self._run = Segments(scale=scale, anchor=anchor, cur=anchor.copy(),
                                      n_anchor=len(anchor))
                self._stopped = len(anchor) < MOTION_MIN_CORNERS  # measure_motion stops too
            elif self._run is not None:
                self._run.step(self.frames, i, is_last=False)
        except Exception:  # noqa: BLE001 - looking ahead must never fail the selection
            self._stopped = True

    def tracks_for(self, res: FramesResult, frames_dir: str | os.PathLike) -> FrameTracks | None:
        """The :class:`FrameTracks` of the kept frames of ``res`` (files in ``frames_dir``), or
        ``None`` when they are not the candidates looked at (some were dropped) or looking
        ahead stopped."""
        if self._stopped or len(res["frames"]) != len(self.frames):
            return None
        self.frames.paths = [Path(frames_dir) / f["file"] for f in res["frames"]]
        return self.frames


# --- the near-duplicate test, done ahead ----------------------------------------------------

@dataclass
class Candidate:
    """The sharpest usable frame of a window: its record, analysis image and decoded frame
    (held until the window ends, then converted (:func:`.frame_scores.output_image`) and
    written as ``tmp``); ``lookahead``: the near-duplicate test's work done ahead
    (:func:`look_ahead`)."""

    window: int
    rec: ScoreRecord
    gray: np.ndarray
    frame: av.VideoFrame | None
    tmp: str = ""
    lookahead: Future[tuple[np.ndarray, float | None]] | None = None


def look_ahead(prev: Candidate | None, cand: Candidate) -> tuple[np.ndarray, float | None]:
    """The near-duplicate test of :func:`.frame_select._reject` for ``cand`` as it would run
    when ``prev`` (the candidate before it) is the last kept frame: ``(corners of cand, median
    LK motion from prev)``; the motion is ``None`` when the test would not run (no ``prev``,
    fewer than ``MOTION_MIN_CORNERS`` corners in it, another image size). Runs on the decode
    pass's helper thread while decoding goes on (corners and LK are OpenCV calls that release
    the GIL); :func:`.frame_select._reject` uses the result only in that case, so its outcome
    is unchanged."""
    pts = corners(cand.gray, NEAR_DUPLICATE_CORNERS)
    if prev is None or prev.lookahead is None or prev.gray.shape != cand.gray.shape:
        return pts, None
    prev_pts = prev.lookahead.result()[0]  # done: one worker runs the tasks in order
    if len(prev_pts) < MOTION_MIN_CORNERS:
        return pts, None
    return pts, track_median(prev.gray, prev_pts, cand.gray)


def ahead_result(c: Candidate) -> tuple[np.ndarray, float | None] | None:
    """The look-ahead's result for ``c``; ``None`` without one or when it failed (then
    :func:`.frame_select._reject` does the work itself, and meets any error there)."""
    if c.lookahead is None:
        return None
    try:
        return c.lookahead.result()
    except Exception:  # noqa: BLE001 - recomputed on this thread
        log.debug("near-duplicate look-ahead failed", exc_info=True)
        return None
