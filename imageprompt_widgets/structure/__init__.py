"""Structure: the ControlNet kinds (edges, depth), their maps and the plan that tells a run which
pipeline and inputs keep an image's layout (ControlNet units, img2img).
"""
