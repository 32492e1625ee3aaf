"""The recovery ladder's rungs: what each one tries, and how many attempts it can make.

Each rung (:data:`RUNGS`, run by :func:`.ladder.run_ladder` in the order of
:data:`.ladder.STEPS`) adds pairs (``more_overlap``, ``exhaustive``, ``loop_closure``,
``more_frames``) or changes how the same matches are mapped (``other_mapper``,
``init_thresholds``, ``focal_prior``, ``camera_model``), through :mod:`.ladder_attempt`. Why
the rungs exist and in which order: :mod:`.ladder`. Import lazily: it loads pycolmap.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import ladder_attempt as la
from . import sfm_cameras as scam
from . import sfm_features as sf
from . import sfm_matching as sfmatch
from .ladder_attempt import LadderConfig, LadderState, Plan

#: ``more_overlap``: every image with its next ``MORE_OVERLAP`` images (linear overlap). The
#: matching stage's sequential pairs use pycolmap 4.2.1's quadratic overlap, which (measured)
#: gives only the distances 1, 2, 4, 8, 16, ... (119 pairs for 30 frames); this adds 3, 5-7,
#: 9, 10 (245 pairs for 30 frames, 445 for 50, 945 for 100). Skipped when exhaustive matching
#: is allowed and cheap (it is a superset).
MORE_OVERLAP = 10
#: ``exhaustive`` only when all pairs number at most this (50 frames -> 1225 pairs, about 35 s
#: of matching on 2 cores at 2048 features).
EXHAUSTIVE_MAX_PAIRS = 1225
#: COLMAP's initial-pair thresholds (``IncrementalMapperOptions`` defaults):
#: init_min_num_inliers 100, init_min_tri_angle 16 deg, init_max_error 4 px,
#: abs_pose_min_num_inliers 30. ``init_thresholds`` halves them (error doubled).
RELAXED_INIT: dict[str, Any] = {"init_min_num_inliers": 50, "init_min_tri_angle": 8.0,
                                "init_max_error": 8.0, "abs_pose_min_num_inliers": 15}
#: Camera models tried by ``camera_model`` (COLMAP ``src/colmap/sensor/models.h``).
CAMERA_MODELS = ("OPENCV", "OPENCV_FISHEYE")


def _num_pairs(st: LadderState) -> int:
    return st.frames * (st.frames - 1) // 2


def _exhaustive_is_cheap(cfg: LadderConfig, st: LadderState) -> bool:
    return "exhaustive" in cfg.steps and _num_pairs(st) <= EXHAUSTIVE_MAX_PAIRS


def _rung_more_overlap(cfg: LadderConfig, st: LadderState) -> None:
    if _exhaustive_is_cheap(cfg, st):
        la.skip(st, "more_overlap", "exhaustive_matching_is_cheap", {"pairs": _num_pairs(st)})
    elif not st.names_ordered:  # an unordered photo set: neighbours by name are no neighbours
        la.skip(st, "more_overlap", "images_have_no_order", {"pairs": _num_pairs(st)})
    elif la.fits(cfg, st, "more_overlap"):
        plan = Plan("more_overlap", {"overlap": MORE_OVERLAP, "quadratic_overlap": False},
                    f"more overlap ({MORE_OVERLAP} neighbours)")
        la.match_then_map(cfg, st, plan, lambda: sfmatch.sequential_pairs(
            cfg.database_path, MORE_OVERLAP, quadratic=False))


def _rung_exhaustive(cfg: LadderConfig, st: LadderState) -> None:
    n_pairs = _num_pairs(st)
    if n_pairs > EXHAUSTIVE_MAX_PAIRS:
        la.skip(st, "exhaustive", "too_many_pairs",
                {"pairs": n_pairs, "max_pairs": EXHAUSTIVE_MAX_PAIRS})
    elif la.fits(cfg, st, "exhaustive"):
        plan = Plan("exhaustive", {"pairs": n_pairs}, f"exhaustive matching ({n_pairs} pairs)")
        la.match_then_map(cfg, st, plan, lambda: sfmatch.all_pairs(cfg.database_path))
        st.exhaustive_done = True


def _rung_loop_closure(cfg: LadderConfig, st: LadderState) -> None:
    if st.exhaustive_done:
        la.skip(st, "loop_closure", "exhaustive_matching_covered_all_pairs")
        return
    if not la.fits(cfg, st, "loop_closure"):
        return
    vocab = cfg.work / "own_vocabulary.bin"

    def pairs() -> list[sfmatch.Pair]:
        sfmatch.build_own_vocabulary(cfg.database_path, vocab)
        return sfmatch.loop_closure_pairs(cfg.database_path, vocab)

    plan = Plan("loop_closure", {"num_images": sfmatch.LOOP_NUM_IMAGES,
                                 "vocabulary": "built from this job's descriptors",
                                 "vocab_words": sfmatch.LOOP_VOCAB_WORDS},
                "loop closure (own vocabulary)")
    try:
        la.match_then_map(cfg, st, plan, pairs)
    finally:
        vocab.unlink(missing_ok=True)


def _rung_other_mapper(cfg: LadderConfig, st: LadderState) -> None:
    if la.fits(cfg, st, "other_mapper"):
        other = "incremental" if cfg.mapper == "global" else "global"
        la.map_attempt(cfg, st, Plan("other_mapper", {"mapper": other}, f"{other} mapper",
                                     mapper=other), time.monotonic())


def _rung_init_thresholds(cfg: LadderConfig, st: LadderState) -> None:
    if la.fits(cfg, st, "init_thresholds"):  # initial-pair thresholds exist only incrementally
        settings = {**RELAXED_INIT, "mapper": "incremental"}
        la.map_attempt(cfg, st, Plan("init_thresholds", settings,
                                     "relaxed initial-pair thresholds", mapper="incremental",
                                     mapper_options=RELAXED_INIT), time.monotonic())


def _rung_focal_prior(cfg: LadderConfig, st: LadderState) -> None:
    focal = cfg.focal_prior_px
    if not focal:
        la.skip(st, "focal_prior", "no_focal_length_metadata")
        return
    for fixed in (False, True):
        if la.good_enough(cfg, st) or not la.fits(cfg, st, "focal_prior"):
            return
        t0 = time.monotonic()
        model = sf.read_camera(cfg.database_path).model_name
        saved = scam.set_camera_model(cfg.database_path, model, focal_px=focal, prior=True)
        how = "fixed" if fixed else "refined"  # each camera its own prior (issue 15)
        settings = {"focal_px": scam.prior_record(focal), "camera_model": model, "focal": how,
                    "mapper": "incremental"}
        # held fixed: incremental mapping (its bundle adjustment option is documented)
        options = {"pipeline": {"ba_refine_focal_length": False}} if fixed else None
        attempt = la.map_attempt(cfg, st, Plan(
            "focal_prior", settings, f"focal length {scam.prior_text(focal)} from metadata, {how}",
            mapper="incremental", mapper_options=options, veto=True), t0)
        attempt.camera_kept = la.kept(st)
        if not attempt.camera_kept:
            scam.restore_cameras(cfg.database_path, saved)


def _rung_camera_model(cfg: LadderConfig, st: LadderState) -> None:
    for model in CAMERA_MODELS:
        if la.good_enough(cfg, st) or not la.fits(cfg, st, "camera_model"):
            return
        t0 = time.monotonic()
        # a known focal length stays the starting point (and trusted) with any model
        saved = scam.set_camera_model(cfg.database_path, model, focal_px=cfg.focal_prior_px,
                                    prior=bool(cfg.focal_prior_px))
        attempt = la.map_attempt(cfg, st, Plan("camera_model", {"camera_model": model},
                                               f"camera model {model}"), t0)
        attempt.camera_kept = la.kept(st)
        if not attempt.camera_kept:
            scam.restore_cameras(cfg.database_path, saved)  # did not help: undo


def _rung_more_frames(cfg: LadderConfig, st: LadderState) -> None:
    if cfg.more_frames is None:
        la.skip(st, "more_frames", "no_frame_source")
        return
    if not la.fits(cfg, st, "more_frames"):
        return
    t0 = time.monotonic()
    la.report(cfg, st, la.window(st)[0],
              la.headline(cfg, st, "more frames: adding frames between the selected ones"))
    got = cfg.more_frames()
    if not got.added:
        la.skip(st, "more_frames", "no_usable_frames_between",
                elapsed_s=round(time.monotonic() - t0, 3))
        return
    st.frames = int(got.frames)
    st.added.extend(got.added)
    settings = {"added_frames": len(got.added), "frames": st.frames}

    def pairs() -> list[sfmatch.Pair]:
        if st.exhaustive_done and _num_pairs(st) <= EXHAUSTIVE_MAX_PAIRS:
            return sfmatch.all_pairs(cfg.database_path)
        return sfmatch.sequential_pairs(cfg.database_path, sfmatch.SEQUENTIAL_OVERLAP)

    plan = Plan("more_frames", settings, f"more frames ({len(got.added)} added)")
    la.match_then_map(cfg, st, plan, pairs, t0=t0, always_map=True)


@dataclass(frozen=True)
class Rung:
    """A rung: what it does, and how many mapping attempts it can make at most."""

    run: Callable[[LadderConfig, LadderState], None]
    max_attempts: Callable[[LadderConfig, LadderState], int]


def _one(cfg: LadderConfig, st: LadderState) -> int:
    return 1


#: The rung table, in :data:`.ladder.STEPS` order.
RUNGS: dict[str, Rung] = {
    "more_overlap": Rung(_rung_more_overlap,
                         lambda c, s: 0 if _exhaustive_is_cheap(c, s) else 1),
    "exhaustive": Rung(_rung_exhaustive,
                       lambda c, s: int(_num_pairs(s) <= EXHAUSTIVE_MAX_PAIRS)),
    "loop_closure": Rung(_rung_loop_closure,
                         lambda c, s: 0 if _exhaustive_is_cheap(c, s)
                         and c.steps.index("exhaustive") < c.steps.index("loop_closure") else 1),
    "other_mapper": Rung(_rung_other_mapper, _one),
    "init_thresholds": Rung(_rung_init_thresholds, _one),
    "focal_prior": Rung(_rung_focal_prior, lambda c, s: 2 if c.focal_prior_px else 0),
    "camera_model": Rung(_rung_camera_model, lambda c, s: len(CAMERA_MODELS)),
    "more_frames": Rung(_rung_more_frames, lambda c, s: int(c.more_frames is not None)),
}
