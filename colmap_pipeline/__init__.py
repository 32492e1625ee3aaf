"""COLMAP worker: video in, 3D reconstruction out."""
__version__ = "1.0.0"
