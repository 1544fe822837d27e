"""Runs a list of training jobs in one ``torchrun`` launch (tests/train/test_fsdp.py,
tests/train/test_tensor_parallel.py).

``argv[1]``: JSON list of ``{"dir", "opts", "cut", "resume", "dit"}`` (``dit``: the tiny
DiT config instead of the tiny U-Net's) or ``{"mesh": [dp, tp], "out"}`` (tp_step's three
steps on that mesh, rank 0 writes the weights to ``out``); the process group is made here
once, so each Trainer leaves it open for the next job.  Rank 0 prints ``FINAL <loss>`` per
training job.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from train_helpers import ToyData, tiny_config, tiny_dit_config

from difflab.train import Trainer, train

torch.set_num_threads(1)
dist.init_process_group("gloo")
for job in json.loads(sys.argv[1]):
    if "mesh" in job:
        from safetensors.torch import save_file
        from tp_step import mesh_steps

        weights = mesh_steps(tuple(job["mesh"]))
        if os.environ["RANK"] == "0":
            save_file(weights, job["out"])
        continue
    cfg = (tiny_dit_config if job.get("dit") else tiny_config)(job["dir"], *job["opts"])
    if job.get("cut"):
        trainer = Trainer.from_config(cfg, dataset=ToyData())
        try:
            trainer.run(stop_at=job["cut"], resume=job.get("resume", False))
        finally:
            trainer.close()
        if not job.get("then_resume"):
            continue
    result = train(cfg, dataset=ToyData(), resume=job.get("resume", False) or bool(job.get("cut")))
    if os.environ["RANK"] == "0":
        print("FINAL", result.final_loss, flush=True)
dist.destroy_process_group()
