"""SIFT matching and pair choice: which image pairs to match, and verified matches in the database.

Owns the pair generators (sequential, exhaustive, retrieval by the job's own vocabulary, loop
closure), matching and geometric verification in chunks (``match_image_pairs``), and the
database totals a matching call or a failed reconstruction reports (:class:`MatchSummary`,
:class:`DatabaseStats`). Features and cameras come first (:mod:`.sfm_features`). Import this
module lazily (inside a pipeline stage): it loads pycolmap.

Facts used here (checked on pycolmap 4.2.1, CPU build):

* ``VocabTreePairGenerator`` reads the vocabulary that :func:`build_own_vocabulary` writes (a
  ``VisualIndex``), as ``SequentialPairGenerator``'s loop detection does.
* ``match_image_pairs`` on the pairs of ``SequentialPairGenerator`` gives the same verified pairs
  as ``match_sequential`` and can run in chunks (real progress).
* ``SequentialPairingOptions.quadratic_overlap`` gives the distances 1, 2, 4, ... only (up to
  ``overlap`` of them); without it, the distances 1 .. ``overlap``.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pycolmap

from ..errors import PipelineError
from .progress import Progress, no_progress
from .sfm_features import PathLike, chunks, device, image_names

Pair = tuple[int, int]

#: Sequential matching: each image is matched with the next ``SEQUENTIAL_OVERLAP`` images and,
#: with quadratic overlap, images 2**k further (COLMAP's defaults, ``SequentialPairingOptions``).
SEQUENTIAL_OVERLAP = 10
#: Image pairs per ``match_image_pairs`` call (119 sequential pairs for 30 frames: one call
#: 4.0-4.9 s, four chunks 5.7 s; now two).
MIN_PAIRS_PER_CHUNK = 60
TARGET_CHUNKS = 10
#: Own vocabulary for offline loop closure: visual words and descriptors sampled to build it
#: (COLMAP's downloadable trees have 32K-1M words for millions of images; a job has at most a
#: few hundred thousand descriptors, so a few hundred words keep the build to ~1-2 s on 2
#: cores), and images retrieved per query (COLMAP's ``loop_detection_num_images`` default 50 is
#: meant for long videos; a job has <= 100 frames).
LOOP_VOCAB_WORDS = 256
LOOP_VOCAB_SAMPLE = 20000
LOOP_NUM_IMAGES = 8
#: Unordered photo sets too large for exhaustive matching: each photo is paired with its
#: ``RETRIEVAL_NUM_IMAGES`` most similar photos by the same own vocabulary (no time
#: neighbours to add; COLMAP's ``VocabTreePairingOptions.num_images`` default 100 is meant for
#: collections of thousands; 51-300 photos here: 20 gives at most 20 n pairs, against
#: n (n - 1) / 2 for exhaustive, 1,275-44,850).
RETRIEVAL_NUM_IMAGES = 20
#: Overrides of pycolmap's ``FeatureMatchingOptions`` (the :data:`SIFT_MATCHING_KEYS` go to its
#: ``sift`` part) and ``TwoViewGeometryOptions`` (the :data:`RANSAC_KEYS` go to its ``ransac``
#: part). Empty = COLMAP's defaults: with ~800 keypoints a frame, no watermark detection and
#: fewer RANSAC trials measured no faster (issue 14, BENCHMARKS.md); kept as the benchmark's
#: handle (``scripts/bench_speed_levers.py``).
MATCHING_OPTIONS: dict[str, object] = {}
VERIFICATION_OPTIONS: dict[str, object] = {}
SIFT_MATCHING_KEYS = ("max_ratio", "max_distance", "cross_check", "cpu_brute_force_matcher")
RANSAC_KEYS = ("max_error", "min_inlier_ratio", "confidence", "min_num_trials",
               "max_num_trials", "dyn_num_trials_multiplier")


@dataclass(frozen=True)
class MatchSummary:
    """What a matching call did, and the database's totals after it.

    Attributes:
        image_pairs: pairs matched by this call (0: nothing new to match).
        matched_pairs: pairs with raw matches in the database.
        verified_pairs: pairs with a verified two-view geometry in the database.
        inlier_matches: verified (inlier) matches over all pairs.
        device: ``cpu`` or ``cuda``.
        method: how the pairs were chosen: ``sequential`` (neighbours in time: videos, ordered
            photo sets), ``exhaustive`` (every pair of an unordered set), ``retrieval`` (an
            unordered set too large for that: pairs from the job's own vocabulary), or
            ``pairs`` (a given list).
    """

    image_pairs: int
    matched_pairs: int
    verified_pairs: int
    inlier_matches: int
    device: str
    method: str = "pairs"

    def to_dict(self) -> dict[str, object]:
        """Plain dict (the matching stage's checkpoint summary)."""
        return asdict(self)


@dataclass(frozen=True)
class DatabaseStats:
    """Numbers that explain a failed reconstruction (``PipelineError.details``).

    Attributes:
        images: images in the database.
        median_keypoints_per_image: median SIFT keypoints per image.
        matched_pairs: image pairs matched (tried), whatever the outcome.
        verified_pairs: image pairs whose two-view geometry has inlier matches (COLMAP's own
            ``num_verified_image_pairs`` counts every pair tried).
        best_pair_inliers: inlier matches of the best verified pair (0: none).
        inlier_matches: verified matches over all pairs.
    """

    images: int
    median_keypoints_per_image: float
    matched_pairs: int
    verified_pairs: int
    best_pair_inliers: int
    inlier_matches: int

    def to_dict(self) -> dict[str, object]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


def _match_totals(db: pycolmap.Database, image_pairs: int, dev: pycolmap.Device,
                  method: str = "pairs") -> MatchSummary:
    return MatchSummary(image_pairs=image_pairs, matched_pairs=db.num_matched_image_pairs(),
                        verified_pairs=db.num_verified_image_pairs(),
                        inlier_matches=db.num_inlier_matches(), device=dev.name, method=method)


def _match_pairs(database_path: PathLike, pairs: list[Pair], id_to_name: dict[int, str],
                 use_gpu: bool, progress: Progress, num_threads: int,
                 method: str = "pairs") -> MatchSummary:
    """Match and verify ``pairs`` (image ids) in chunks with ``match_image_pairs``."""
    dev = device(use_gpu)
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = num_threads
    matching.use_gpu = dev == pycolmap.Device.cuda
    for k, v in MATCHING_OPTIONS.items():
        setattr(matching.sift if k in SIFT_MATCHING_KEYS else matching, k, v)
    verification = pycolmap.TwoViewGeometryOptions()
    for k, v in VERIFICATION_OPTIONS.items():
        setattr(verification.ransac if k in RANSAC_KEYS else verification, k, v)
    done = 0
    progress(0.0, f"Matching image pairs (0/{len(pairs)})...")
    fd, list_path = tempfile.mkstemp(prefix=".pairs_", suffix=".txt",
                                     dir=os.path.dirname(os.path.abspath(database_path)))
    os.close(fd)
    try:
        for chunk in chunks(pairs, MIN_PAIRS_PER_CHUNK, TARGET_CHUNKS):
            with open(list_path, "w", encoding="utf-8") as fh:
                fh.writelines(f"{id_to_name[a]} {id_to_name[b]}\n" for a, b in chunk)
            imported = pycolmap.ImportedPairingOptions()
            imported.match_list_path = list_path
            pycolmap.match_image_pairs(database_path, matching_options=matching,
                                       pairing_options=imported,
                                       verification_options=verification, device=dev)
            done += len(chunk)
            progress(done / len(pairs), f"Matching image pairs ({done}/{len(pairs)})...")
    finally:
        os.unlink(list_path)
    with pycolmap.Database.open(str(database_path)) as db:
        return _match_totals(db, len(pairs), dev, method)


def sequential_pairs(database_path: PathLike, overlap: int = SEQUENTIAL_OVERLAP,
                     quadratic: bool = True) -> list[Pair]:
    """Pairs of COLMAP's ``SequentialPairGenerator`` in name order (= time order), without loop
    detection (it needs a vocabulary tree). pycolmap 4.2.1 (measured): ``quadratic=True``
    gives the distances 1, 2, 4, ... only (up to ``overlap`` of them), ``quadratic=False`` the
    distances 1 .. ``overlap``."""
    pairing = pycolmap.SequentialPairingOptions()
    pairing.overlap = int(overlap)
    pairing.quadratic_overlap = bool(quadratic)
    pairing.loop_detection = False
    with pycolmap.Database.open(str(database_path)) as db:
        return [(int(a), int(b))
                for a, b in pycolmap.SequentialPairGenerator(pairing, db).all_pairs()]


def all_pairs(database_path: PathLike) -> list[Pair]:
    """Every unordered pair of images (exhaustive matching: n (n - 1) / 2 pairs)."""
    ids = sorted(image_names(database_path))
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]


def match_sequential(database_path: PathLike, use_gpu: bool = False,
                     progress: Progress = no_progress, num_threads: int = -1,
                     overlap: int = SEQUENTIAL_OVERLAP) -> MatchSummary:
    """Match SIFT features between frames that are close in time, then verify geometrically.

    Pairs come from :func:`sequential_pairs` (each image with the next ``overlap`` images,
    quadratic overlap); they are matched in chunks with ``match_image_pairs`` (brute-force SIFT
    matching with ratio test 0.8 and cross-check, then two-view geometry verification with
    RANSAC: COLMAP defaults).

    Raises:
        PipelineError("reconstruction_failed"): no image pair could be formed (< 2 images).
    """
    pairs = sequential_pairs(database_path, overlap, quadratic=True)
    id_to_name = image_names(database_path)
    if not pairs:
        raise PipelineError("reconstruction_failed", details={
            "reason": "no image pairs to match", "images": len(id_to_name)})
    return _match_pairs(database_path, pairs, id_to_name, use_gpu, progress, num_threads,
                        "sequential")


def retrieval_pairs(database_path: PathLike, num_images: int = RETRIEVAL_NUM_IMAGES) -> list[Pair]:
    """Pairs of an unordered set by image retrieval: a vocabulary built from this database's own
    descriptors (:func:`build_own_vocabulary`, the ladder's ``loop_closure`` rung uses the same)
    and COLMAP's ``VocabTreePairGenerator`` (every image with its ``num_images`` most similar
    images). The vocabulary file lives beside the database and is removed."""
    fd, vocab = tempfile.mkstemp(prefix=".vocab_", suffix=".bin",
                                 dir=os.path.dirname(os.path.abspath(database_path)))
    os.close(fd)
    try:
        build_own_vocabulary(database_path, vocab)
        pairing = pycolmap.VocabTreePairingOptions()
        pairing.num_images = int(num_images)
        pairing.vocab_tree_path = vocab
        with pycolmap.Database.open(str(database_path)) as db:
            seen = {(min(int(a), int(b)), max(int(a), int(b)))
                    for a, b in pycolmap.VocabTreePairGenerator(pairing, db).all_pairs()
                    if a != b}
    finally:
        os.unlink(vocab)
    return sorted(seen)


def match_photos(database_path: PathLike, ordered: bool, max_exhaustive_pairs: int,
                 use_gpu: bool = False, progress: Progress = no_progress,
                 num_threads: int = -1) -> MatchSummary:
    """Match a photo set as its order allows (issue 15): an ordered set
    (:func:`.photos.photo_order`) like a video (:func:`match_sequential`); an unordered one
    exhaustively (:func:`all_pairs`) while n (n - 1) / 2 <= ``max_exhaustive_pairs`` (the
    ladder's ``EXHAUSTIVE_MAX_PAIRS``), else by retrieval (:func:`retrieval_pairs`). The
    summary's ``method`` and ``image_pairs`` say which, and how many pairs.

    Raises:
        PipelineError("reconstruction_failed"): no image pair could be formed (< 2 images).
    """
    if ordered:
        return match_sequential(database_path, use_gpu, progress, num_threads)
    id_to_name = image_names(database_path)
    n = len(id_to_name)
    if n * (n - 1) // 2 <= max_exhaustive_pairs:
        method, pairs = "exhaustive", all_pairs(database_path)
    else:
        progress(0.0, f"Building a vocabulary from the photos' features ({n} photos)...")
        method, pairs = "retrieval", retrieval_pairs(database_path)
    if not pairs:
        raise PipelineError("reconstruction_failed", details={
            "reason": "no image pairs to match", "images": n})
    return _match_pairs(database_path, pairs, id_to_name, use_gpu, progress, num_threads,
                        method)


def match_new_pairs(database_path: PathLike, pairs: list[Pair], use_gpu: bool = False,
                    progress: Progress = no_progress, num_threads: int = -1) -> MatchSummary:
    """Match and verify those of ``pairs`` (image ids, either order) that the database does not
    hold yet; ``image_pairs`` of the result counts them (0: nothing to do)."""
    id_to_name = image_names(database_path)
    seen: set[Pair] = set()
    todo: list[Pair] = []
    with pycolmap.Database.open(str(database_path)) as db:
        for a, b in pairs:
            key = (min(int(a), int(b)), max(int(a), int(b)))
            if key[0] == key[1] or key in seen or not set(key) <= id_to_name.keys():
                continue
            seen.add(key)
            if not db.exists_matches(*key):
                todo.append(key)
        totals = _match_totals(db, 0, device(use_gpu))
    if not todo:
        progress(1.0, "No further image pairs to match")
        return totals
    return _match_pairs(database_path, todo, id_to_name, use_gpu, progress, num_threads)


def clear_matches(database_path: PathLike) -> None:
    """Delete all matches and two-view geometries from the database (keeps features)."""
    with pycolmap.Database.open(str(database_path)) as db:
        db.clear_matches()
        db.clear_two_view_geometries()


def database_stats(database_path: PathLike) -> DatabaseStats:
    """Keypoints and verified pairs of the database: why mapping had (or lacked) material."""
    with pycolmap.Database.open(str(database_path)) as db:
        per_image = [db.num_keypoints_for_image(im.image_id) for im in db.read_all_images()]
        _, inliers = db.read_two_view_geometry_num_inliers()
        return DatabaseStats(
            images=len(per_image),
            median_keypoints_per_image=float(statistics.median(per_image)) if per_image else 0.0,
            matched_pairs=int(db.num_matched_image_pairs()),
            verified_pairs=sum(1 for n in inliers if n > 0),
            best_pair_inliers=int(max(inliers, default=0)),
            inlier_matches=int(db.num_inlier_matches()))


def build_own_vocabulary(database_path: PathLike, vocab_path: PathLike,
                         num_words: int = LOOP_VOCAB_WORDS, sample: int = LOOP_VOCAB_SAMPLE,
                         seed: int = 0) -> dict[str, object]:
    """Build a visual-word vocabulary (COLMAP ``VisualIndex``: k-means words + Hamming
    embedding, Schoenberger et al., ACCV 2016) from this database's own SIFT descriptors and
    write it to ``vocab_path``. Offline: nothing is downloaded (COLMAP's default
    ``vocab_tree_path`` is a URL; this file replaces it).

    Returns:
        ``{"vocab_words": int, "descriptors_sampled": int, "path": str}``.

    Raises:
        PipelineError("reconstruction_failed"): the database holds no descriptors.
    """
    with pycolmap.Database.open(str(database_path)) as db:
        arrays = [np.asarray(db.read_descriptors(im.image_id).data, dtype=np.float32)
                  for im in db.read_all_images()]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise PipelineError("reconstruction_failed", details={"reason": "no descriptors"})
    desc = np.concatenate(arrays)
    rng = np.random.default_rng(seed)
    if len(desc) > sample:
        desc = desc[rng.choice(len(desc), sample, replace=False)]
    words = int(max(16, min(num_words, len(desc) // 8)))
    index = pycolmap.VisualIndex.create(128, 64)
    opts = pycolmap.VisualIndex.BuildOptions()
    opts.num_visual_words = words
    opts.num_iterations = 20
    opts.num_rounds = 1
    index.build(opts, pycolmap.FeatureDescriptorsFloat(pycolmap.FeatureExtractorType.SIFT,
                                                       np.ascontiguousarray(desc)))
    index.write(str(vocab_path))
    return {"vocab_words": words, "descriptors_sampled": int(len(desc)), "path": str(vocab_path)}


def loop_closure_pairs(database_path: PathLike, vocab_path: PathLike,
                       num_images: int = LOOP_NUM_IMAGES) -> list[Pair]:
    """Image pairs from COLMAP's sequential pairing with loop detection against the local
    vocabulary ``vocab_path`` (every image queries the index for its ``num_images`` most
    similar images; overlap 1 adds the neighbours)."""
    pairing = pycolmap.SequentialPairingOptions()
    pairing.overlap = 1
    pairing.quadratic_overlap = False
    pairing.loop_detection = True
    pairing.loop_detection_period = 1
    pairing.loop_detection_num_images = int(num_images)
    pairing.vocab_tree_path = str(vocab_path)
    with pycolmap.Database.open(str(database_path)) as db:
        return [(int(a), int(b))
                for a, b in pycolmap.SequentialPairGenerator(pairing, db).all_pairs() if a != b]
