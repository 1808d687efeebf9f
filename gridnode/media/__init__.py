"""
Media handling: ``probe`` (ffprobe JSON into a checked ``ProbeResult``),
``presets`` (output presets and the ffmpeg argv built from them, no I/O),
``ffmpeg`` (the ProcessProtocol that runs ffmpeg with progress, timeouts and
process-group kills) and ``pool`` (bounded FIFO of concurrent jobs with a
scratch directory each).

Nothing here imports the global reactor: every entry point takes one.
"""
