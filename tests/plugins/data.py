"""A small real dataset (a slice of the offline corpus) built once per test session."""

from __future__ import annotations

import pytest

from neurons.corpus import stdlib_documents
from neurons.dataset import DatasetInfo, prepare_dataset
from protocol.data import PageStore
from protocol.hparams import HParams, load_hparams


@pytest.fixture(scope="session")
def tiny_hp() -> HParams:
    return load_hparams("tiny")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_hp) -> DatasetInfo:
    out = tmp_path_factory.mktemp("tiny-data")
    return prepare_dataset(tiny_hp, out, list(stdlib_documents(1_500_000)))


@pytest.fixture(scope="session")
def tiny_store(tiny_dataset, tiny_hp) -> PageStore:
    return PageStore(tiny_dataset.path, tiny_hp)
