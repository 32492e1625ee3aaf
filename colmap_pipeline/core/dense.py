"""Dense reconstruction on a CUDA GPU: undistortion, PatchMatch stereo, fusion, Poisson mesh.

Loads :mod:`pycolmap` only inside the functions that run it, so a skipped dense or meshing
stage child (no GPU) does not pay for the import (issue 14). Steps, each a plain
function of ``(paths, options)``:

1. :func:`undistort` - ``pycolmap.undistort_images`` writes a COLMAP dense workspace
   (``images/``, ``sparse/``, ``stereo/``) with PINHOLE cameras, capped at the preset's size.
2. :func:`patch_match` - ``pycolmap.patch_match_stereo`` (Schoenberger et al., "Pixelwise View
   Selection for Unstructured Multi-View Stereo", ECCV 2016). **Needs CUDA**: pycolmap raises
   without it, so :func:`dense_possible` is checked first.
3. :func:`fuse` - ``pycolmap.stereo_fusion`` merges the depth/normal maps into ``fused.ply``
   (runs on the CPU; checked on the CPU build of pycolmap 4.2.1).
4. :func:`mesh` - ``pycolmap.poisson_meshing`` (screened Poisson, Kazhdan & Hoppe, ToG 2013)
   with density trimming (``trim``: vertices whose sample density is below this value are
   removed), then the PLY is written again as binary GLB through trimesh.

Facts checked on pycolmap 4.2.1 (CPU build): ``stereo_fusion`` and ``poisson_meshing`` run
without CUDA; ``poisson_meshing`` on an empty point cloud crashes the process (SIGSEGV), so
:func:`mesh` refuses an empty cloud first; a cloud too sparse for the octree depth gives a PLY
with no vertex, which is an error here, never an artifact.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PipelineError
from .progress import Progress, no_progress

if TYPE_CHECKING:
    import pycolmap

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DensePreset:
    """Dense parameters of one quality preset.

    Values follow COLMAP's automatic reconstructor
    (``src/colmap/controllers/automatic_reconstruction.cc``): low/medium/high cap images at
    1000/1600/2400 px, low and medium use ``window_step`` 2 with fewer samples/iterations and
    no geometric consistency, high uses COLMAP's defaults with geometric consistency; fusion
    checks 25/33/50 images. Poisson octree depth 9/10/11 (COLMAP's default 13 is for large
    photo sets; each level multiplies memory by about 4) and trim 7 (COLMAP's default is 10;
    lower keeps more of a sparse video scene).

    Attributes:
        max_image_size: longest side (px) of undistorted images, PatchMatch and fusion.
        window_radius, window_step, num_samples, num_iterations: PatchMatch (COLMAP names).
        geom_consistency: PatchMatch geometric-consistency pass (slower, cleaner depth).
        check_num_images: fusion: overlapping images checked per image.
        poisson_depth: octree depth of the Poisson solve.
        poisson_trim: density trim of the Poisson mesh (0 = none).
        input_type: fusion input: ``geometric`` when geom_consistency ran, else ``photometric``.
    """

    max_image_size: int
    window_radius: int
    window_step: int
    num_samples: int
    num_iterations: int
    geom_consistency: bool
    check_num_images: int
    poisson_depth: int
    poisson_trim: float

    @property
    def input_type(self) -> str:
        """``geometric`` or ``photometric`` (which depth maps fusion reads)."""
        return "geometric" if self.geom_consistency else "photometric"

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        return {**asdict(self), "input_type": self.input_type}


DENSE_PRESETS: dict[str, DensePreset] = {
    "low": DensePreset(1000, 4, 2, 7, 3, False, 25, 9, 7.0),
    "medium": DensePreset(1600, 4, 2, 10, 5, False, 33, 10, 7.0),
    "high": DensePreset(2400, 5, 1, 15, 5, True, 50, 11, 7.0),
}
#: Presets that run the dense stages by default (low only when asked: ``dense_low=True``).
DENSE_BY_DEFAULT = ("medium", "high")

#: GPU memory of one PatchMatch job, bytes, estimated as
#: ``PATCHMATCH_BYTES_PER_PIXEL * width * height * (1 + sources)`` + ``PATCHMATCH_BASE_BYTES``.
#: PatchMatch keeps per reference pixel depth, normal, cost per source and random state, and
#: per source image a float texture; 64 bytes/pixel-image and 600 MiB for the CUDA context
#: are upper estimates, to be replaced by the peak memory scripts/gpu_check.sh measures.
PATCHMATCH_BYTES_PER_PIXEL = 64
PATCHMATCH_BASE_BYTES = 600 * 1024**2
#: Source images per reference image (``undistort_images`` ``num_patch_match_src_images``,
#: COLMAP's default 20).
NUM_SOURCE_IMAGES = 20


def dense_possible() -> bool:
    """True when this pycolmap was built with CUDA and a CUDA device answers."""
    from .sfm_mapping import gpu_capabilities

    return bool(gpu_capabilities()["dense_possible"])


#: Reasons of a skipped dense stage (in the job's results; a skip is not a failure).
SKIP_NO_GPU = "dense skipped: no CUDA GPU"
SKIP_LOW = "dense skipped: not requested at low quality"


def dense_skip_reason(job: dict) -> str | None:
    """Why the dense stages of ``job`` (``job.json`` as read by ``pipeline.read_job``) do not
    run, or ``None`` when they do: no GPU in use (``use_gpu`` false, e.g. COLMAP_CPU_ONLY, or
    no CUDA device), or ``low`` quality without ``job["dense_low"]``."""
    if not job.get("use_gpu") or not dense_possible():
        return SKIP_NO_GPU
    if job["preset"].quality not in DENSE_BY_DEFAULT and not job.get("dense_low"):
        return SKIP_LOW
    return None


def patchmatch_memory_bytes(width: int, height: int, preset: DensePreset,
                            sources: int = NUM_SOURCE_IMAGES) -> int:
    """Estimated GPU memory (bytes) of one PatchMatch job on ``width`` x ``height`` frames
    after the preset's size cap (see :data:`PATCHMATCH_BYTES_PER_PIXEL`)."""
    scale = min(1.0, preset.max_image_size / max(width, height, 1))
    pixels = int(width * scale) * int(height * scale)
    return PATCHMATCH_BYTES_PER_PIXEL * pixels * (1 + sources) + PATCHMATCH_BASE_BYTES


def max_concurrent_dense_jobs(gpu_total_bytes: int, width: int, height: int,
                              preset: DensePreset, reserve_fraction: float = 0.1) -> int:
    """How many PatchMatch jobs fit in ``gpu_total_bytes`` (NVML ``memory.total``) leaving
    ``reserve_fraction`` free; at least 1 (one job always runs, alone).

    Example: a 16 GiB T4 with 1920x1080 frames at ``high`` (2400 px cap: no downscale):
    64 B * 2.07 Mpx * 21 + 600 MiB = 3.3 GiB per job -> 4 jobs.
    """
    per_job = patchmatch_memory_bytes(width, height, preset)
    return max(1, math.floor(gpu_total_bytes * (1 - reserve_fraction) / per_job))


def undistort(model_dir: str | os.PathLike, image_dir: str | os.PathLike,
              dense_dir: str | os.PathLike, preset: DensePreset) -> dict:
    """Undistort the registered images of the model into a COLMAP dense workspace.

    Returns: ``{"images": int}`` (undistorted images written, read from the folder).
    """
    import pycolmap

    dense = Path(dense_dir)
    dense.mkdir(parents=True, exist_ok=True)
    opts = pycolmap.UndistortCameraOptions()
    opts.max_image_size = int(preset.max_image_size)
    pycolmap.undistort_images(str(dense), str(model_dir), str(image_dir),
                              output_type="COLMAP", undistort_options=opts,
                              num_patch_match_src_images=NUM_SOURCE_IMAGES)
    return {"images": sum(1 for p in (dense / "images").iterdir() if p.is_file())}


def patch_match(dense_dir: str | os.PathLike, preset: DensePreset, gpu_index: int = 0) -> dict:
    """PatchMatch stereo on the GPU over the dense workspace (writes ``stereo/*_maps``).

    Raises:
        PipelineError("dense_failed"): no CUDA (pycolmap raises) or no depth map written.
    """
    import pycolmap

    opts = pycolmap.PatchMatchOptions()
    opts.max_image_size = int(preset.max_image_size)
    opts.window_radius = int(preset.window_radius)
    opts.window_step = int(preset.window_step)
    opts.num_samples = int(preset.num_samples)
    opts.num_iterations = int(preset.num_iterations)
    opts.geom_consistency = bool(preset.geom_consistency)
    opts.filter = True  # fusion needs filtered maps (COLMAP: "filtering must be enabled")
    opts.gpu_index = str(gpu_index)  # a string in pycolmap 4.2 ("0", "0,1", "-1" = all)
    try:
        pycolmap.patch_match_stereo(str(dense_dir), workspace_format="COLMAP", options=opts)
    except Exception as exc:  # noqa: BLE001 - e.g. "requires CUDA"
        raise PipelineError("dense_failed", details={"step": "patch_match",
                                                     "reason": str(exc)[:300]}) from None
    maps = list((Path(dense_dir) / "stereo" / "depth_maps").glob(f"*.{preset.input_type}.bin"))
    if not maps:
        raise PipelineError("dense_failed", details={"step": "patch_match",
                                                     "reason": "no depth map written"})
    return {"depth_maps": len(maps)}


def fuse(dense_dir: str | os.PathLike, fused_ply: str | os.PathLike, preset: DensePreset,
         input_type: str | None = None, options: pycolmap.StereoFusionOptions | None = None
         ) -> dict:
    """Fuse depth and normal maps into a coloured point cloud (binary PLY with normals).

    ``dense_dir`` is a COLMAP dense workspace: ``images/``, ``sparse/``,
    ``stereo/{depth_maps,normal_maps}/NAME.{geometric|photometric}.bin`` and
    ``stereo/fusion.cfg`` (image names, one per line).

    Returns: ``{"fused_points": int}``.
    Raises: PipelineError("dense_failed"): fusion produced no point.
    """
    import pycolmap

    opts = options or pycolmap.StereoFusionOptions()
    if options is None:
        opts.max_image_size = int(preset.max_image_size)
        opts.check_num_images = int(preset.check_num_images)
    opts.mask_path = ""  # default "." would look for masks next to the working directory
    rec = pycolmap.stereo_fusion(str(fused_ply), str(dense_dir), workspace_format="COLMAP",
                                 input_type=input_type or preset.input_type, options=opts,
                                 output_type="PLY")
    n = int(rec.num_points3D()) if rec is not None else ply_vertex_count(fused_ply)
    if n == 0:
        n = ply_vertex_count(fused_ply)
    if n == 0:
        raise PipelineError("dense_failed", details={"step": "fusion", "fused_points": 0})
    return {"fused_points": n}


def ply_vertex_count(path: str | os.PathLike) -> int:
    """``element vertex N`` from a PLY header (0 when absent or the file is missing)."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                line = raw.strip()
                if line.startswith(b"element vertex"):
                    return int(line.split()[2])
                if line == b"end_header":
                    break
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def mesh(fused_ply: str | os.PathLike, mesh_ply: str | os.PathLike,
         mesh_glb: str | os.PathLike, preset: DensePreset) -> dict:
    """Poisson mesh of the fused cloud, trimmed by density, as PLY and GLB.

    Returns:
        ``{"mesh_vertices": int, "mesh_faces": int, "mesh_ply_bytes": int,
        "mesh_glb_bytes": int}`` read back from the written files.
    Raises:
        PipelineError("dense_failed"): empty input cloud, or a mesh with zero vertices or
            faces (never an artifact).
    """
    import pycolmap
    import trimesh

    if ply_vertex_count(fused_ply) == 0:  # poisson_meshing segfaults on an empty cloud
        raise PipelineError("dense_failed", details={"step": "meshing", "fused_points": 0})
    opts = pycolmap.PoissonMeshingOptions()
    opts.depth = int(preset.poisson_depth)
    opts.trim = float(preset.poisson_trim)
    opts.color = True
    pycolmap.poisson_meshing(str(fused_ply), str(mesh_ply), opts)
    if ply_vertex_count(mesh_ply) == 0:
        raise PipelineError("dense_failed", details={"step": "meshing", "mesh_vertices": 0})
    m = trimesh.load_mesh(str(mesh_ply), process=False)
    if len(m.vertices) == 0 or len(m.faces) == 0:
        raise PipelineError("dense_failed", details={"step": "meshing",
                                                     "mesh_vertices": int(len(m.vertices)),
                                                     "mesh_faces": int(len(m.faces))})
    glb = m.export(file_type="glb")
    if not isinstance(glb, bytes):  # trimesh returns bytes for binary formats
        raise PipelineError("dense_failed", details={"step": "meshing", "reason": "no GLB"})
    Path(mesh_glb).write_bytes(glb)
    return {"mesh_vertices": int(len(m.vertices)), "mesh_faces": int(len(m.faces)),
            "mesh_ply_bytes": os.path.getsize(mesh_ply),
            "mesh_glb_bytes": os.path.getsize(mesh_glb)}


def run_dense(model_dir: str | os.PathLike, image_dir: str | os.PathLike,
              dense_dir: str | os.PathLike, quality: str,
              progress: Progress = no_progress) -> dict:
    """Undistort, PatchMatch (GPU) and fuse; writes ``dense_dir/fused.ply``.

    Returns: ``{"images", "depth_maps", "fused_points", "preset": DensePreset.to_dict()}``.
    Raises: PipelineError("dense_failed") as the steps; KeyError for an unknown quality.
    """
    preset = DENSE_PRESETS[quality]
    progress(0.0, "Undistorting images...")
    out = undistort(model_dir, image_dir, dense_dir, preset)
    progress(0.1, "Computing depth maps (PatchMatch stereo on the GPU)...")
    out.update(patch_match(dense_dir, preset))
    progress(0.85, "Fusing depth maps into a dense point cloud...")
    out.update(fuse(dense_dir, Path(dense_dir) / "fused.ply", preset))
    progress(1.0, f"Fused {out['fused_points']} points")
    out["preset"] = preset.to_dict()
    return out
