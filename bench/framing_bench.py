"""Framing decoder micro-benchmarks: frames/s from one buffer, per-byte cost byte-at-a-time."""

from __future__ import annotations

import argparse
import json
import time

from wirekit_framing import FrameDecoder, encode


def per_byte_ns(size: int) -> float:
    wire = encode(b"x" * size, size)
    decoder = FrameDecoder(max_frame_size=size)
    view = memoryview(wire)
    feed = decoder.feed
    t0 = time.perf_counter()
    for i in range(len(wire)):
        feed(view[i : i + 1])
    return (time.perf_counter() - t0) / len(wire) * 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    large = (2 if args.quick else 16) * 1024 * 1024
    buf = encode(b"y" * 100) * 1_000_000
    decoder = FrameDecoder()
    t0 = time.perf_counter()
    frames = decoder.feed(buf)
    frames_per_s = len(frames) / (time.perf_counter() - t0)
    # relay(): what the framed echo calls per read -- a header walk, no copy of the frames.
    t0 = time.perf_counter()
    count, _ = FrameDecoder().relay(buf)
    relay_frames_per_s = count / (time.perf_counter() - t0)
    small_ns = per_byte_ns(1024 * 1024)
    large_ns = per_byte_ns(large)
    whole = encode(b"z" * large, large)
    t0 = time.perf_counter()
    FrameDecoder(max_frame_size=large).feed(whole)
    whole_ns = (time.perf_counter() - t0) / len(whole) * 1e9
    print(json.dumps({
        "frames_per_s": frames_per_s, "relay_frames_per_s": relay_frames_per_s,
        "per_byte_small_ns": small_ns,
        "per_byte_large_ns": large_ns, "linearity": large_ns / small_ns,
        "whole_per_byte_ns": whole_ns, "large_bytes": large,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
