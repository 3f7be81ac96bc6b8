"""Shared fixtures: the real PolyRefuse checkout, the stand-in cache and a prepared prompt table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def shared_data_folder() -> Path:
    """Return ``../shared/data`` beside the repository (CI lays it there), or fail clearly."""
    from_environment = os.environ.get("LRSAFETY_POLYREFUSE")
    if from_environment:
        return Path(from_environment).parent
    return REPOSITORY.parent / "shared" / "data"


@pytest.fixture(scope="session")
def polyrefuse_source() -> Path:
    source = shared_data_folder() / "multilingual-refusal"
    if not (source / "PolyRefuse").is_dir():
        pytest.fail(
            f"PolyRefuse checkout not found at {source}; set LRSAFETY_POLYREFUSE to a "
            "Multilingual-Refusal checkout (CI points it at ../shared/data/multilingual-refusal)"
        )
    return source


@pytest.fixture(scope="session")
def completions_folder() -> Path:
    folder = shared_data_folder() / "completions"
    if not folder.is_dir():
        pytest.fail(f"shared completions not found at {folder}")
    return folder


@pytest.fixture(scope="session", autouse=True)
def standin_cache(tmp_path_factory) -> Path:
    """Keep built stand-ins in one cache for the whole session (reused across tests)."""
    if "LRSAFETY_CACHE" not in os.environ:
        os.environ["LRSAFETY_CACHE"] = str(tmp_path_factory.mktemp("lrsafety-cache"))
    return Path(os.environ["LRSAFETY_CACHE"])


@pytest.fixture(scope="session")
def prepared_data_dir(tmp_path_factory, polyrefuse_source) -> Path:
    """A data folder holding the tidy table built from the real PolyRefuse files."""
    from lrsafety.data import prepare_data

    data_dir = tmp_path_factory.mktemp("data")
    prepare_data(polyrefuse_source, data_dir=data_dir)
    return data_dir
