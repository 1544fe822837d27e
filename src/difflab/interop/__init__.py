"""The formats other tools use: Stable Diffusion checkpoints (diffusers folders and the
original single files), their schedulers and text encoders, kohya/LyCORIS adapters and
AUTOMATIC1111's PNG metadata.  Each module maps one foreign format onto difflab's own
networks and files; the networks themselves live in ``difflab.models``.
"""
