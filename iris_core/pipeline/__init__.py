"""Segmenting one target: preprocess -> encode -> predict (sliding windows) -> back to the target -> post-process."""
