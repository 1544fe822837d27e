"""Test-wide settings: one intra-op thread.

The suite's models are tiny; on a 2-core machine torch's thread pool spends more time
synchronising than computing (measured: 83 s -> 3 s for the digits classifier's training
when other work shares the cores).  Tests that need threads set them themselves.
"""

import torch

torch.set_num_threads(1)
