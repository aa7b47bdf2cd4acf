"""Score procedural videos against their captions: `python -m jobs.eval_tiny A.mp4 [B.mp4 ...]`.

Each NAME.mp4 needs NAME.json beside it (the pipeline's sidecar: video.shots, video.fps, and
plan.shot_pixel_frames when present). One video: a table with a row per shot. Several (e.g. the
same script generated with dense, moga+stga, moc, lite attention): one table, a column per video.
The last line is `score=X` (X in [0, 1]; several videos: comma-separated, in argument order).
Bad input: one line on stderr naming the file and key, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.procedural.checker import VideoReport, format_comparison, format_report, score_video
from pipeline.procedural.scenes import CaptionError, parse_caption
from pipeline.procedural.videofile import VideoFileError, read_mp4, read_sidecar, sidecar_path


def evaluate(video: str | Path) -> VideoReport:
    """Decode `video`, read the sidecar beside it, check every shot."""
    if not Path(video).is_file():
        raise VideoFileError(f"{video}: video not found")
    json_path = sidecar_path(video)
    sidecar = read_sidecar(json_path)
    for i, caption in enumerate(sidecar.captions):  # fail on a bad caption before decoding anything
        try:
            parse_caption(caption)
        except CaptionError as e:
            raise VideoFileError(f"{json_path}: video.shots.{i}.prompt: {e}") from None
    frames = read_mp4(video)
    if sum(sidecar.shot_pixel_frames) != len(frames):
        raise VideoFileError(f"{json_path}: plan.shot_pixel_frames: {sidecar.shot_pixel_frames} sum to "
                             f"{sum(sidecar.shot_pixel_frames)} frames but {video} decodes to {len(frames)}")
    return score_video(frames, sidecar.captions, sidecar.shot_pixel_frames)


def column_names(videos: list[str]) -> list[str]:
    """File stems, or whole paths where two stems collide."""
    stems = [Path(v).stem for v in videos]
    return stems if len(set(stems)) == len(stems) else list(videos)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.eval_tiny", description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="+", help="MP4 files, each with NAME.json beside it")
    args = parser.parse_args(argv)
    try:
        reports = [evaluate(v) for v in args.videos]
    except VideoFileError as e:
        print(f"eval_tiny: {e}", file=sys.stderr)
        return 2
    if len(reports) == 1:
        print(format_report(reports[0]))
    else:
        print(format_comparison(reports, column_names(args.videos)))
    print("score=" + ",".join(f"{r.score:.4f}" for r in reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
