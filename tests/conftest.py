"""Shared fixtures: each plugin module starts one real part (data, S3 server, chain) for the tests."""

import torch

pytest_plugins = ["tests.plugins.data", "tests.plugins.chain", "tests.plugins.s3", "tests.plugins.network", "tests.plugins.hostile_s3"]

torch.set_num_threads(2)
