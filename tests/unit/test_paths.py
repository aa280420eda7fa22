"""path_map: folders that are the same on both sides, under different paths."""

from __future__ import annotations

import pytest

from ssh_provisioner.errors import ProvisionerConfigError
from ssh_provisioner.paths import PathMap

MAP = PathMap.parse(
    [
        {"local": "/home/me/projects", "remote": "/scratch/me/projects"},
        {"local": "/home/me/projects/big/", "remote": "/data/big"},
        {"local": "/srv", "remote": "/"},
    ]
)


def test_a_folder_and_what_is_below_it_map_both_ways() -> None:
    assert MAP.to_remote("/home/me/projects") == "/scratch/me/projects"
    assert MAP.to_remote("/home/me/projects/foo/nb") == "/scratch/me/projects/foo/nb"
    assert MAP.to_local("/scratch/me/projects/foo/data.csv") == "/home/me/projects/foo/data.csv"


def test_the_longest_match_wins_on_either_side() -> None:
    assert MAP.to_remote("/home/me/projects/big/x") == "/data/big/x"
    assert MAP.to_local("/data/big/x") == "/home/me/projects/big/x"
    assert MAP.to_local("/etc/passwd") == "/srv/etc/passwd"  # "/" is a folder too


def test_what_no_folder_maps_is_none() -> None:
    assert MAP.to_remote("/home/me/projects2/x") is None  # a prefix is not a folder
    assert MAP.to_remote("/home/me") is None
    assert PathMap.parse([]).to_local("/scratch/me/projects") is None
    assert MAP.to_remote("/home/me/projects/../secret") is None  # normalised first


@pytest.mark.parametrize(
    "value",
    [
        {"local": "/a", "remote": "/b"},
        [{"local": "a", "remote": "/b"}],
        [{"local": "/a"}],
        [{"local": "/a", "remote": "/b", "extra": 1}],
        ["/a:/b"],
    ],
)
def test_what_is_not_a_list_of_absolute_pairs_is_refused(value: object) -> None:
    with pytest.raises(ProvisionerConfigError, match="path_map"):
        PathMap.parse(value)
