"""upload-proxy: stream HTTP uploads of any size into S3 multipart uploads with bounded memory."""

__version__ = "0.1.0"
