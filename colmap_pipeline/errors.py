"""Stable error codes shared by the pipeline, the runner and the HTTP API.

Every failure a user can see carries a ``code`` (stable, snake_case, safe to switch on in a
frontend), a ``message`` (what happened) and a ``hint`` (what the user can do about it).
This module imports nothing from the web or database layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# code -> (HTTP status when raised during an API request, default message, default hint)
ERROR_CATALOG: dict[str, tuple[int, str, str]] = {
    # upload / request errors
    "invalid_request": (422, "The request is invalid.", "Check the form fields against /docs."),
    "empty_file": (400, "The uploaded file is empty.", "Upload a non-empty video file."),
    "upload_too_large": (413, "The upload exceeds the size limit.",
                         "Trim or re-encode the video so it is smaller than the limit."),
    "no_video_stream": (415, "The file holds no decodable video stream.",
                        "Upload a video file such as MP4 (H.264/HEVC) or MOV."),
    "video_too_long": (422, "The video is longer than the allowed duration.",
                       "Trim the video to the allowed duration and upload it again."),
    # named by the probe (colmap_pipeline/core/video_probe.py)
    "still_image": (415, "The file is a still image, not a video.",
                    "Upload a video here; to reconstruct from photos, send at least 3 "
                    "overlapping photos (or a zip of them) to POST /upload-images."),
    "video_incomplete": (422, "The video file is incomplete: its index is missing, as after an "
                         "interrupted transfer or recording.",
                         "Upload the complete file again."),
    "clip_too_short": (422, "The clip is too short to show the scene from different viewpoints.",
                       "Upload a clip of at least a few seconds, moving the camera sideways "
                       "around the subject."),
    "unsafe_archive": (422, "The zip archive was refused as unsafe or unreadable.",
                       "Send a plain zip of JPEG/PNG photos: no folders outside the archive "
                       "('..' or absolute paths), no links, at most 1000 entries, no "
                       "highly compressible padding."),
    "unsupported_image": (415, "A file is not a JPEG or PNG photo.",
                          "Upload only .jpg/.jpeg/.png photos (or a zip of them)."),
    "upload_timeout": (408, "The upload stalled: no data arrived for too long.",
                       "Check the connection and upload the file again."),
    "idempotency_key_reused": (422, "This Idempotency-Key was used for a different request.",
                               "Use a new Idempotency-Key for a new upload; repeat a request "
                               "with its key only when it is the same file and fields."),
    "rate_limited": (429, "Too many uploads from this client.",
                     "Wait for the number of seconds in Retry-After and try again."),
    "not_found": (404, "Not found.", "Check the id: GET /jobs lists existing jobs."),
    "unauthorized": (401, "A valid API key is required.",
                     "Send your key as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'."),
    "link_expired": (401, "This link has expired or was altered.",
                     "Fetch the job again (GET /jobs/{job_id}) for fresh download links."),
    "quota_exceeded": (429, "This API key has too many jobs waiting.",
                       "Wait until some of your pending jobs start or cancel some; waiting "
                       "alone does not help while they stay pending."),
    "artifact_not_found": (404, "This job has no artifact with that name.",
                           "GET /jobs/{job_id} lists the job's artifacts."),
    "invalid_range": (400, "The Range header is malformed.",
                      "Ask for bytes, e.g. 'Range: bytes=0-1023', with start <= end; or send "
                      "no Range header for the whole file."),
    "range_not_satisfiable": (416, "The Range header asks for bytes past the end of the file.",
                              "Ask within the file's size (Content-Range: bytes */SIZE of this "
                              "answer), or send no Range header."),
    "log_not_available": (404, "This replica has no stage log of the job.",
                          "The stages ran on another replica (bucket mode); follow the job's "
                          "events (GET /jobs/{job_id}/events) instead."),
    "job_not_completed": (409, "The job has no results yet.",
                          "Poll GET /jobs/{job_id} until its status is completed."),
    "not_ready": (503, "The service is not ready.", "Retry in a few seconds."),
    "internal_error": (500, "Internal server error.",
                       "Retry; if it persists, contact the operator."),
    # pipeline errors (stored on the job; the HTTP status is unused there)
    "too_few_frames": (422, "Too few frames could be decoded from the video.",
                       "Upload a longer clip (at least a few seconds of video)."),
    "insufficient_motion": (422, "The camera barely moves in this video, so depth cannot be "
                            "recovered.",
                            "Walk or fly around the subject, moving the camera sideways; "
                            "turning on the spot or holding still gives no parallax."),
    # degenerate clips named by the frames stage before SfM (colmap_pipeline/core/clip_checks.py)
    "video_truncated": (422, "The video file is damaged or cut short: too little of it decodes.",
                        "Upload the complete file again (the upload or the recording may have "
                        "been interrupted)."),
    "too_dark": (422, "The video is too dark: almost every frame is black.",
                 "Film in better light or raise the exposure; remove the lens cap."),
    "overexposed": (422, "The video is blown out: almost every frame is white.",
                    "Lower the exposure or avoid pointing the camera at bright light."),
    "textureless": (422, "The frames show almost no texture, so no features can be matched.",
                    "Film a scene with visible detail (not a blank wall, sky or water) and "
                    "keep it in focus."),
    "too_blurry": (422, "The frames are too blurry to find features in.",
                   "Move the camera more slowly, keep the subject in focus, and film in "
                   "good light so the shutter stays fast."),
    "rotation_only": (422, "The camera only turns on the spot (like a tripod pan), so depth "
                      "cannot be recovered.",
                      "Walk around or alongside the subject instead of turning in place; "
                      "sideways camera movement gives the parallax SfM needs."),
    # named by the ladder from the verified matches (colmap_pipeline/core/match_diagnostics.py)
    "insufficient_parallax": (422, "No pair of views shows enough parallax to recover depth: "
                              "every pair is explained by a camera turning or a flat scene.",
                              "Move the camera sideways around a subject with depth (walk "
                              "around it, or along it), keeping it in view; turning on the "
                              "spot, zooming or filming a flat wall head-on gives no depth."),
    "disconnected_scenes": (422, "The input shows unrelated scenes that share no matched "
                            "features, so they cannot form one model.",
                            "Upload each scene as its own clip or photo set, and film "
                            "continuously (no cuts, no fast turns) so that neighbouring views "
                            "overlap."),
    "frames_not_ready": (409, "The job has no frame selection yet.",
                         "Wait until the Frame Extraction stage has run, then retry."),
    "reconstruction_failed": (422, "COLMAP could not build a usable model from this video.",
                              "Film a well-lit, textured, static scene with slow sideways camera "
                              "motion and plenty of overlap between views."),
    "no_initial_pair": (422, "No two frames could start a model: no image pair has enough "
                        "matched features seen from different enough viewpoints.",
                        "Move the camera sideways between views (not only forward, and not by "
                        "turning on the spot), keep the subject in view from frame to frame, "
                        "and film a textured, static scene."),
    "pipeline_crashed": (500, "The reconstruction process crashed.",
                         "Retry the job; if it crashes again, report the job id."),
    "pipeline_error": (500, "The reconstruction process failed unexpectedly.",
                       "Retry the job; if it fails again, report the job id."),
    "job_timeout": (500, "The job exceeded its time limit.",
                    "Use a lower quality preset or a shorter clip."),
    # dense reconstruction (issue 6; GPU only)
    "dense_failed": (500, "Dense reconstruction produced no usable point cloud or mesh.",
                     "The sparse model is kept; film more overlapping, textured views, or use "
                     "the sparse result."),
    # job lifecycle (issue 5)
    "insufficient_storage": (507, "The server has too little free disk space.",
                             "Retry later; the operator must free disk space or raise capacity."),
    "job_not_cancellable": (409, "Only pending or processing jobs can be cancelled.",
                            "GET /jobs/{job_id} shows the job's status."),
    "retry_limit_reached": (409, "The job has been retried as often as allowed.",
                            "GET /jobs/{job_id} shows why each attempt ended; upload the "
                            "video again to start a new job."),
    "job_not_retryable": (409, "Only failed or cancelled jobs can be retried.",
                          "GET /jobs/{job_id} shows the job's status; an expired job's files "
                          "are gone, upload the video again."),
    "workspace_busy": (500, "Another process is still writing this job's workspace.",
                       "Retry the job in a minute; if it persists, report the job id."),
    "storage_error": (500, "A database or disk error stopped the job.",
                      "Retry the job; if it fails again, report the job id."),
    # webhooks (issue 16)
    "webhook_url_not_allowed": (422, "The webhook_url cannot be used.",
                                "Send a public http(s) URL whose host resolves to public "
                                "addresses only (no loopback, private or link-local ones)."),
    "webhooks_not_configured": (422, "This server sends no webhooks: WEBHOOK_SECRET is not set.",
                                "Upload without webhook_url and poll GET /jobs/{job_id}, or ask "
                                "the operator to set WEBHOOK_SECRET."),
}


@dataclass
class PipelineError(Exception):
    """A failure with a stable code, a message and a hint for the user.

    Raised by the pipeline core (``video``, ``reconstruction``, ``pipeline``) and by the
    upload/ingest glue; the API layer turns it into the JSON error shape with the HTTP status
    from :data:`ERROR_CATALOG`.

    Attributes:
        code: key of :data:`ERROR_CATALOG`.
        message: human explanation; defaults to the catalog's.
        hint: what the user can do; defaults to the catalog's.
        details: optional JSON-serialisable facts (measured values, limits).
    """

    code: str
    message: str = ""
    hint: str = ""
    details: dict | None = None

    def __post_init__(self) -> None:
        if self.code not in ERROR_CATALOG:
            raise ValueError(f"unknown error code {self.code!r}")
        _, msg, hint = ERROR_CATALOG[self.code]
        self.message = self.message or msg
        self.hint = self.hint or hint
        super().__init__(f"{self.code}: {self.message}")

    @property
    def http_status(self) -> int:
        """HTTP status used when this error answers a request."""
        return ERROR_CATALOG[self.code][0]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"code", "message", "hint", "details"?}``."""
        out: dict[str, Any] = {"code": self.code, "message": self.message, "hint": self.hint}
        if self.details:
            out["details"] = self.details
        return out
