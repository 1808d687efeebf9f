"""
Media handling: ``probe`` (ffprobe JSON into a checked ``ProbeResult``),
``presets`` (output presets and the ffmpeg argv built from them, no I/O),
``child`` (how a child runs: timeouts, process-group kills, a backup timer),
``ffmpeg`` (the child that runs ffmpeg with progress), ``sandbox`` (limits and
user of every child) and ``pool`` (bounded FIFO of concurrent jobs with a
scratch directory each).

Nothing here imports the global reactor: every entry point takes one.
"""
