"""Subnet hyperparameters carry the real chain's storage bounds: `--subnet-param tempo=99999999999999999999999`
(or ImmunityPeriod, ActivityCutoff, MinAllowedWeights above u16, WeightsVersionKey above u64) was accepted
silently; the real chain stores these as u16 / u64 and could never hold such a value."""

import pytest

from devnet.chain_state import parse_subnet_params
from devnet.launch_plan import DevnetConfig


@pytest.mark.parametrize("item, field", [("tempo=99999999999999999999999", "tempo"), ("Tempo=65536", "tempo"),
                                         ("ImmunityPeriod=70000", "immunity_period"),
                                         ("ActivityCutoff=65536", "activity_cutoff"),
                                         ("MinAllowedWeights=65536", "min_allowed_weights"),
                                         ("MaxAllowedValidators=65536", "max_allowed_validators"),
                                         ("WeightsVersionKey=18446744073709551616", "weights_version_key"),
                                         ("WeightsSetRateLimit=18446744073709551616", "weights_rate_limit")])
def test_a_value_the_real_chain_cannot_store_is_refused_naming_the_field(item, field):
    with pytest.raises(ValueError, match=rf"(?s){field}.*less than or equal to"):
        parse_subnet_params([item])
    with pytest.raises(ValueError, match=field):
        DevnetConfig(subnet_params=[item])


def test_the_largest_storable_values_are_accepted():
    got = parse_subnet_params(["Tempo=65535", "WeightsVersionKey=18446744073709551615"])
    assert got == {"tempo": "65535", "weights_version_key": "18446744073709551615"}


def test_long_windows_get_an_immunity_period_the_chain_can_store():
    from devnet.bootstrap import subnet_params_for
    from protocol.hparams import load_hparams

    assert subnet_params_for(load_hparams("tiny", ["windows.blocks_per_window=7000"])).immunity_period == 65535
