"""facebatch: find and fingerprint every face in a large photo archive."""

__version__ = "0.1.0"
