#!/usr/bin/env python3
"""Make a clip "shaken to blur": every frame smeared by a motion-blur kernel, plus camera shake.

The measurements behind ``ladder.BLURRY_FAILURE_SHARPNESS`` were made with it (the sample walk,
kernel lengths 9-75 px, shake 6-8 px, then ``python -m colmap_pipeline reconstruct OUT WS
--quality low``). Each frame gets a straight-line kernel of ``--length`` px in a random
direction (seeded) and a random translation with ``--shake`` px standard deviation.

Usage::

    python scripts/blur_clip.py samples/max-heromode.mp4 /tmp/b75.mp4 --length 75 --shake 8
"""
from __future__ import annotations

import argparse

import av
import cv2
import numpy as np


def motion_kernel(length: int, angle: float) -> np.ndarray:
    """A normalised ``length`` x ``length`` line kernel through the centre at ``angle`` rad."""
    k = np.zeros((length, length), np.float32)
    c = length // 2
    for t in np.linspace(-c, c, 4 * length):
        k[int(round(c + t * np.sin(angle))), int(round(c + t * np.cos(angle)))] = 1
    return k / k.sum()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--length", type=int, default=31, help="kernel length, px")
    ap.add_argument("--shake", type=float, default=6.0, help="shake std deviation, px")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with av.open(args.src) as ic, av.open(args.dst, "w") as oc:
        vs = ic.streams.video[0]
        out = oc.add_stream("libx264", rate=30)
        out.width, out.height, out.pix_fmt = vs.codec_context.width, vs.codec_context.height, \
            "yuv420p"
        out.options = {"crf": "18", "preset": "veryfast"}
        for frame in ic.decode(vs):
            img = frame.to_ndarray(format="bgr24")
            if args.length > 1:
                img = cv2.filter2D(img, -1, motion_kernel(args.length, rng.uniform(0, np.pi)))
            if args.shake:
                m = np.float32([[1, 0, rng.normal(0, args.shake)],
                                [0, 1, rng.normal(0, args.shake)]])
                img = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]),
                                     borderMode=cv2.BORDER_REFLECT)
            for packet in out.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                oc.mux(packet)
        for packet in out.encode():
            oc.mux(packet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
