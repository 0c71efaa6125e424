"""Batch runs over folders, lists and datasets (resumable, sharded with accelerate) and CLIP embedding
exports: the engine applied to many images, with a manifest.
"""
