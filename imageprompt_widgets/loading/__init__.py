"""One loader: the model cache, components, config bounds, offline twins, downloads, memory levels, LoRA
and what is on this machine. It is handed what each method needs; it knows nothing of generation.
"""
