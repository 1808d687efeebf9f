from twisted.application.service import ServiceMaker

gridnode = ServiceMaker(
    "gridnode",
    "gridnode.tap",
    "A video conversion node: uploads over HTTP, ffmpeg workers, results in S3 or a folder",
    "gridnode",
)
