"""Command line: ``python -m colmap_pipeline COMMAND ...``.

Commands (stdout carries JSON only; logs go to stderr):

``reconstruct VIDEO OUT_DIR [--quality low|medium|high] [--max-frames N] [--device auto|cpu|cuda]``
    Run every stage in this process with ``OUT_DIR`` as the workspace. Prints ``result.json``
    as one JSON object. Exit 0; on a :class:`PipelineError` prints ``{"error": {code, message,
    hint, details?}}`` and exits 2; on any other exception the same shape with code
    ``pipeline_error`` and exit 4.

``stage NAME --workspace WS``
    Run one stage (used by the server runner: one child process per stage). stdout is a
    protocol of one JSON object per line, flushed per line, nothing else:
    ``{"event": "progress", "stage": NAME, "fraction": 0.0-1.0, "message": str}`` (fraction
    never decreases), then either ``{"event": "done", "stage": NAME, "summary": {...}}`` and exit
    0, or ``{"event": "error", "stage": NAME, "code", "message", "hint", "details"}`` and exit 3
    (:class:`PipelineError`) / exit 4 (any other exception, code ``pipeline_error``). A crash in
    native code ends the process by signal (e.g. SIGABRT: return code -6) without a final line.

``probe FILE``
    Print :func:`video_probe.probe_upload` as JSON; on error ``{"error": {...}}`` and exit 2.

``gpu-probe``
    Print :func:`sfm_mapping.gpu_capabilities` as JSON (exit 0).

When started by the server (``COLMAP_WORKER_PARENT_PID`` set), the process first calls
:func:`colmap_pipeline.core.child.harden_child` (dies with its parent, runs at lower priority).

Native libraries (glog, FFmpeg, COLMAP) may write to file descriptor 1. Every command therefore
duplicates the real stdout for its JSON and points fd 1 (and ``sys.stdout``) at stderr before
any work starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import IO, NoReturn

from ..errors import PipelineError
from ..protocol import (  # the child protocol's exit statuses (shared with the runner)
    EXIT_OK,
    EXIT_PIPELINE_ERROR,
    EXIT_STAGE_CRASH,
    EXIT_STAGE_PIPELINE_ERROR,
)

log = logging.getLogger("colmap_pipeline")


def _protocol_stream() -> IO[str]:
    """Return a text stream on the real stdout and send fd 1 / ``sys.stdout`` to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", buffering=1)


def _emit(out: IO[str], obj: dict) -> None:
    out.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    out.flush()


def _internal_error(exc: BaseException) -> PipelineError:
    return PipelineError("pipeline_error", details={"exception": type(exc).__name__,
                                                    "detail": str(exc)[:500]})


def _cmd_probe(args, out) -> int:
    from .video_probe import probe_upload as probe_video  # probe + clip length check

    try:
        _emit(out, probe_video(args.file))
    except PipelineError as exc:
        _emit(out, {"error": exc.to_dict()})
        return EXIT_PIPELINE_ERROR
    return EXIT_OK


def _cmd_gpu_probe(args, out) -> int:
    from .sfm_mapping import gpu_capabilities

    _emit(out, gpu_capabilities())
    return EXIT_OK


def _cmd_reconstruct(args, out) -> int:
    from ..presets import default_preset
    from .pipeline import STAGES, overall_progress, run_all

    preset = default_preset(args.quality)
    if args.max_frames:
        from dataclasses import replace

        preset = replace(preset, max_frames=args.max_frames)
    use_gpu = {"auto": None, "cpu": False, "cuda": True}[args.device]
    last: list[tuple[str, str]] = []

    def progress(stage: str, fraction: float, message: str) -> None:
        key = (stage, message)
        if not last or key != last[-1]:
            last[:] = [key]
            log.info("[%5.1f%%] %s: %s", overall_progress(stage, fraction), STAGES[stage], message)

    if not os.path.exists(args.video):  # before any folder is made (trial 2: the missing file
        # was reported as a file with no video stream, with a hint to upload another)
        exc = PipelineError("invalid_request", message=f"No file or folder {args.video!r}.",
                            hint="Give the path of a video file or of a folder of photos.",
                            details={"input": args.video})
        log.error("%s", exc)
        _emit(out, {"error": exc.to_dict()})
        return EXIT_PIPELINE_ERROR
    try:
        result = run_all(args.video, args.out_dir, preset, progress=progress, use_gpu=use_gpu)
        log.info("results: %s (artifacts in %s)", os.path.join(args.out_dir, "result.json"),
                 os.path.join(args.out_dir, "artifacts"))
    except PipelineError as exc:
        log.error("%s", exc)
        _emit(out, {"error": exc.to_dict()})
        return EXIT_PIPELINE_ERROR
    except Exception as exc:  # noqa: BLE001 - report any failure in the JSON shape
        traceback.print_exc()
        _emit(out, {"error": _internal_error(exc).to_dict()})
        return EXIT_STAGE_CRASH
    _emit(out, result)
    return EXIT_OK


@dataclass
class _Sent:
    """The last progress event a stage child sent (fraction never decreases)."""

    fraction: float = -1.0
    message: str | None = None


def _cmd_stage(args, out) -> int:
    from .pipeline import run_stage

    sent = _Sent()

    def progress(fraction: float, message: str) -> None:
        f = round(min(1.0, max(sent.fraction, float(fraction), 0.0)), 4)
        if f - sent.fraction >= 0.005 or message != sent.message:
            sent.fraction, sent.message = f, message
            _emit(out, {"event": "progress", "stage": args.name, "fraction": f,
                        "message": message})

    try:
        summary = run_stage(args.name, args.workspace, progress)
    except PipelineError as exc:
        log.error("stage %s failed: %s", args.name, exc)
        _emit(out, {"event": "error", "stage": args.name, **exc.to_dict(),
                    "details": exc.details or {}})
        return EXIT_STAGE_PIPELINE_ERROR
    except Exception as exc:  # noqa: BLE001 - report any failure on the protocol
        traceback.print_exc()
        err = _internal_error(exc)
        _emit(out, {"event": "error", "stage": args.name, **err.to_dict(),
                    "details": err.details or {}})
        return EXIT_STAGE_CRASH
    _emit(out, {"event": "done", "stage": args.name, "summary": summary})
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m colmap_pipeline``."""
    from .pipeline import STAGE_ORDER  # light: no pycolmap

    p = argparse.ArgumentParser(prog="python -m colmap_pipeline",
                                description="Video (or photos) in, COLMAP sparse "
                                "reconstruction out.")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                   help="stderr log level (default: info)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reconstruct", help="run the whole pipeline on one video or a folder "
                       "of photos; prints the result JSON, artifacts in OUT_DIR/artifacts")
    r.add_argument("video", metavar="INPUT", help="a video file, or a folder of JPEG/PNG photos")
    r.add_argument("out_dir", metavar="OUT_DIR", help="workspace folder (made if missing)")
    r.add_argument("--quality", choices=["low", "medium", "high"], default="medium")
    r.add_argument("--max-frames", type=int, default=0, help="override the preset's frame cap")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s = sub.add_parser("stage", help="run one stage in a workspace (JSON-lines protocol)")
    s.add_argument("name", choices=STAGE_ORDER)
    s.add_argument("--workspace", required=True)
    pr = sub.add_parser("probe", help="describe a video file")
    pr.add_argument("file")
    sub.add_parser("gpu-probe", help="report CUDA support of pycolmap")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from .child import harden_child

    harden_child()  # PDEATHSIG + nice when started by the server; no-op from a shell
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = _protocol_stream()
    handler = {"reconstruct": _cmd_reconstruct, "stage": _cmd_stage, "probe": _cmd_probe,
               "gpu-probe": _cmd_gpu_probe}[args.command]
    return handler(args, out)


def _flush_all() -> None:
    """Flush Python's streams and logging handlers, then every C ``stdio`` stream (native
    libraries print through them; ``os._exit`` would drop what is still buffered)."""
    import ctypes

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    ctypes.CDLL(None).fflush(None)


def run() -> NoReturn:
    """Entry point of ``python -m colmap_pipeline``: :func:`main`, then end the process at
    once with its exit code (``os._exit``) after :func:`_flush_all`.

    The interpreter's normal teardown (finalising modules, destructors and thread pools of
    pycolmap, OpenCV and FFmpeg) costs 0.2-0.6 s of wall time per process after a
    ``reconstruct`` run on the 2-core machine (about 0.02 s with ``os._exit``; BENCHMARKS.md,
    issue 14), once per CLI run and once per stage child of the server. None of it is needed:
    the stages close their files (atomic renames), the JSON lines on stdout are flushed as
    they are written, and the kernel releases the workspace lock. An exception (argparse's
    ``SystemExit`` included) leaves through the normal path.
    """
    code = main()
    _flush_all()
    os._exit(code)


if __name__ == "__main__":
    run()
