"""Shared fixtures: each plugin module starts one real part (data, S3 server, chain) for the tests."""

import torch

pytest_plugins = ["tests.plugins.data"]

torch.set_num_threads(2)
