"""Issue 3 benchmark: peak memory (max RSS) of ingesting a 4K clip.

Renders a 3840x2160 H.264 clip (moving textured scene, fixed seed) of N seconds at 30 fps,
(in a child process), then in fresh child processes measures the peak resident set
(``VmHWM`` in ``/proc/self/status``):

* ``baseline``: imports PyAV/OpenCV/numpy and the pipeline module, does nothing else;
* ``decode``: decodes every frame with PyAV (same threading as the pipeline), keeps nothing;
* ``extract``: ``frame_select.extract_frames`` at each preset (cap 30/50/100, 1000/1600/2400 px).

Run with two lengths to show that peak memory does not grow with the clip's length:

    .venv/bin/python scripts/bench_ingest_memory.py 3 9
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from colmap_pipeline.core import frame_select, video_decode
out = {}
if sys.argv[2] == "decode":  # bare PyAV decode with the same threading, nothing kept
    import av
    t = time.perf_counter()
    with av.open(sys.argv[3]) as c:
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "AUTO", video_decode.DECODE_MAX_THREADS
        n = sum(1 for _ in c.decode(s))
    out = {"decoded": n, "wall_s": round(time.perf_counter() - t, 2)}
elif sys.argv[2] != "baseline":
    t = time.perf_counter()
    res = frame_select.extract_frames(sys.argv[3], sys.argv[4], int(sys.argv[5]),
                               max_image_size=int(sys.argv[6]))
    out = {"kept": len(res["frames"]), "decoded": res["num_decoded"],
           "wall_s": round(time.perf_counter() - t, 2)}
# VmHWM is this process image's own peak RSS. (ru_maxrss is not: Linux carries the parent's
# RSS at fork over exec, so it would report the rendering parent's peak.)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
out["peak_rss_mib"] = round(int(hwm.split()[1]) / 1024, 1)
print(json.dumps(out))
"""


def render(path: Path, seconds: float, fps: int = 30) -> None:
    import av
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    tex = rng.integers(0, 256, (2160 // 8, 6000 // 8, 3), dtype=np.uint8)
    tex = cv2.resize(tex, (6000, 2160), interpolation=cv2.INTER_CUBIC)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 3840, 2160, "yuv420p"
        s.options = {"crf": "23", "preset": "ultrafast"}
        for i in range(int(seconds * fps)):
            x = (i * 7) % (6000 - 3840)
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(tex[:, x:x + 3840]),
                                            format="bgr24")
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def child(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(REPO), *args], check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(lengths: list[float]) -> None:
    print("baseline (imports only):", child("baseline"))
    with tempfile.TemporaryDirectory() as d:
        for sec in lengths:
            clip = Path(d) / f"4k_{sec:g}s.mp4"
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--render", str(clip), str(sec)], check=True)
            print(f"rendered {clip.name}: {clip.stat().st_size / 2**20:.1f} MiB in "
                  f"{time.perf_counter() - t:.1f} s")
            print(f"  {sec:g} s, decode only:", child("decode", str(clip)))
            for cap, size in ((30, 1000), (50, 1600), (100, 2400)):
                out = Path(d) / f"frames_{sec:g}_{cap}"
                print(f"  {sec:g} s, cap {cap}, {size} px:",
                      child("extract", str(clip), str(out), str(cap), str(size)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        render(Path(sys.argv[2]), float(sys.argv[3]))
    else:
        main([float(a) for a in sys.argv[1:]] or [5.0, 10.0])
