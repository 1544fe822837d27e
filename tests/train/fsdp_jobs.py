"""Runs a list of training jobs in one ``torchrun`` launch (tests/train/test_fsdp.py).

``argv[1]``: JSON list of ``{"dir", "opts", "cut", "resume"}``; the process group is made
here once, so each Trainer leaves it open for the next job.  Rank 0 prints ``FINAL <loss>``
per job.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from train_helpers import ToyData, tiny_config

from difflab.train import Trainer, train

torch.set_num_threads(1)
dist.init_process_group("gloo")
for job in json.loads(sys.argv[1]):
    cfg = tiny_config(job["dir"], *job["opts"])
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
