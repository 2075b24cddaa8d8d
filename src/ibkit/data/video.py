"""Video input: a few uniformly spaced frames, decoded with PyAV, each through the image transform.

InstructBLIP treats a video as ``T`` independent images (4 by default): every frame goes through the
encoder and the Q-Former alone and the frame prompts are concatenated. Frame ``i`` of ``T`` is taken
at ``floor(i * N / T)`` of the ``N`` decoded frames (the start of each of T equal segments), as in
LAVIS's uniform sampling. Datasets whose questions are about a clip of a longer video (iVQA) pass
``start``/``end`` in seconds and the frames are spread over that clip only; a file that ends before
the clip starts is taken to be the already-cut clip and used whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ibkit.data.transforms import BadInputError, ImageTransform

# Every FFmpeg step runs on the calling thread: the decoder (``thread_count``) and the conversion of a
# frame to RGB (``to_image(threads=...)``). PyAV's defaults (0) give each a pool of one thread per core,
# which in a DataLoader only oversubscribes the CPU: the worker processes are already the parallelism.
# And since PyAV 18.1.1 the default conversion hangs in a forked worker once the parent process has
# converted a frame: the worker waits in FFmpeg's avpriv_slicethread_execute with no FFmpeg thread
# alive (seen in this project's CI; tests/test_transforms_collate.py keeps the case).
ONE_THREAD = 1


def uniform_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread evenly over ``total_frames`` (segment starts)."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if total_frames < num_frames:
        raise ValueError(f"cannot take {num_frames} distinct frames from {total_frames}")
    return [(i * total_frames) // num_frames for i in range(num_frames)]


def _open(path: Path):
    """The container, its first video stream set to decode on the calling thread (see :data:`ONE_THREAD`)."""
    import av  # optional dependency (the "video" extra); imported only when a video is read

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise BadInputError("unreadable_video", path, str(error)) from error
    if not container.streams.video:
        container.close()
        raise BadInputError("unreadable_video", path, "the file has no video stream")
    decoder = container.streams.video[0].codec_context
    if decoder is not None:  # None when FFmpeg has no decoder for the stream: decoding reports that
        decoder.thread_count = ONE_THREAD
    return container


def _count_frames(path: Path, start: float | None, end: float | None) -> tuple[int, float | None]:
    """Frames in the clip (from packet timestamps: demuxing only, no decoding, or the header count)
    and the time of the last frame (``None`` when unknown)."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        if start is None and end is None and stream.frames and stream.frames > 0:
            return int(stream.frames), None
        count, last_time = 0, None
        for packet in container.demux(stream):
            if packet.size <= 0:
                continue
            if packet.pts is None or stream.time_base is None:
                count += 1  # no timestamps: counted, and the decoding pass corrects the plan if needed
                continue
            time = float(packet.pts * stream.time_base)
            last_time = time if last_time is None else max(last_time, time)
            count += _in_clip(time, start, end)
        return count, last_time
    except av.error.FFmpegError as error:
        raise BadInputError("unreadable_video", path, str(error)) from error
    finally:
        container.close()


def _in_clip(time: float | None, start: float | None, end: float | None) -> bool:
    if time is None:
        return True
    return (start is None or time >= start) and (end is None or time <= end)


def _decode_at(
    path: Path, indices: list[int], start: float | None, end: float | None
) -> tuple[dict[int, Image.Image], int]:
    """Decode the clip's frames at ``indices``; also return how many frames the clip really has."""
    import av

    wanted = set(indices)
    frames: dict[int, Image.Image] = {}
    in_clip = 0
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if start and stream.time_base is not None:
            # Jump to the key frame before the clip instead of decoding a long video from its start.
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            time = frame.time
            if end is not None and time is not None and time > end:
                break
            if not _in_clip(time, start, end):
                continue
            if in_clip in wanted:
                frames[in_clip] = frame.to_image(threads=ONE_THREAD).convert("RGB")
            in_clip += 1
    except av.error.FFmpegError as error:
        raise BadInputError(
            "unreadable_video", path, f"decoding failed after {in_clip} frames: {error}"
        ) from error
    finally:
        container.close()
    return frames, in_clip


def load_video_frames(
    path: str | Path, num_frames: int = 4, start: float | None = None, end: float | None = None
) -> list[Image.Image]:
    """``num_frames`` uniformly spaced RGB frames of a video file (of its ``[start, end]`` seconds).

    Raises :class:`BadInputError` (reason ``missing_file``, ``unreadable_video`` or
    ``too_few_frames``) so the dataset can skip and count the sample.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError("missing_file", path, "video file not found")
    if start is not None and end is not None and end < start:
        raise BadInputError("malformed_record", path, f"clip end {end}s is before its start {start}s")
    clip = "" if start is None and end is None else f" in clip [{start}, {end}]s"
    expected, last_time = _count_frames(path, start, end)
    if expected < num_frames and start is not None and last_time is not None and last_time < start:
        # The whole file ends before the clip starts: it is the clip itself (cut already), so use all of it.
        start = end = None
        clip = ""
        expected, _ = _count_frames(path, None, None)
    if expected < num_frames:
        raise BadInputError("too_few_frames", path, f"{expected} frame(s){clip}, need {num_frames}")
    indices = uniform_frame_indices(expected, num_frames)
    frames, decoded = _decode_at(path, indices, start, end)
    if decoded != expected:
        # Header counts and packet timestamps can mislead (damaged tail, B-frame reordering at the
        # clip edges): plan again from the real count.
        if decoded < num_frames:
            raise BadInputError(
                "too_few_frames", path, f"{decoded} decodable frame(s){clip}, need {num_frames}"
            )
        indices = uniform_frame_indices(decoded, num_frames)
        frames, decoded = _decode_at(path, indices, start, end)
    missing = [i for i in indices if i not in frames]
    if missing:
        raise BadInputError("unreadable_video", path, f"frames {missing}{clip} could not be decoded")
    return [frames[i] for i in indices]


def video_to_tensor(frames: list[Image.Image], transform: ImageTransform) -> torch.Tensor:
    """Each frame through the image transform, stacked to (T, 3, H, W)."""
    return torch.stack([transform(frame) for frame in frames])


def load_video(
    path: str | Path,
    transform: ImageTransform,
    num_frames: int = 4,
    start: float | None = None,
    end: float | None = None,
) -> torch.Tensor:
    """A video file -> (T, 3, H, W) tensor of ``num_frames`` uniformly spaced, transformed frames."""
    return video_to_tensor(load_video_frames(path, num_frames, start, end), transform)
