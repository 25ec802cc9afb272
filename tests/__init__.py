"""Tests against real parts: an S3 server, the SDK over the devnet chain, torch, real text.

`plugins/` starts each real part once per session (`data`, `s3`, `chain`, `network`); `assets/`
holds stored references (`losses/tiny_sparseloco.json`, checked by `test_reference_loss.py`);
`test_architecture.py` checks the package layering. Long end-to-end runs are marked `slow` and
left out of the default run (`-m slow` runs them).
"""
