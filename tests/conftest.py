"""Fixtures shared by the test modules, built on tests/helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from repdisk.block.rawimage import RawImage
from repdisk.cli import lab, nodeproc
from repdisk.node.config import primary_settings
from repdisk.replication.primary import PrimaryReplica, PrimarySettings
from tests.helpers import cli
from tests.helpers.commands import lab_processes
from tests.helpers.netns import Net, unavailable
from tests.helpers.nodes import Nodes, make_disk
from tests.helpers.replicas import Secondary

#: The PrimaryReplica arguments that are settings (their defaults: the key table's).
SETTINGS = {f.name for f in fields(PrimarySettings)}


@pytest.fixture
def nodes(tmp_path) -> Iterator[Nodes]:
    n = Nodes(str(tmp_path))
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def cli_pair(tmp_path) -> Iterator[cli.Pair]:
    pair = cli.Pair(str(tmp_path))
    for name in ("pri.img", "sec.img"):
        make_disk(pair.path(name), cli.SIZE)
    try:
        yield pair
    finally:
        for role in ("pri", "sec"):
            nodeproc.stop_pidfile(pair.path(f"{role}.pid"))


@pytest.fixture
def lab_dir(tmp_path) -> Iterator[str]:
    """A folder for `repdisk lab --dir`; the lab is taken down at the end, and its nbdkit
    processes killed by pid if `--down` failed."""
    folder = str(tmp_path / "lab")
    try:
        yield folder
    finally:
        lab.down(folder, quiet=True)
        for proc in lab_processes(folder):
            proc.kill()


@pytest.fixture
def net() -> Iterator[Net]:
    """A set of namespaces for one test, removed afterwards; skips where they cannot be made."""
    why = unavailable()
    if why:
        pytest.skip(why)
    with Net() as n:
        yield n


@pytest.fixture
def secondary_factory(tmp_path: Path) -> Iterator[Callable[..., Secondary]]:
    made: list[Secondary] = []

    def make(size: int, fill: int | None = None, filters: tuple[str, ...] = ()) -> Secondary:
        sec = Secondary(tmp_path, f"secondary{len(made)}", size, fill, filters)
        made.append(sec)
        return sec

    yield make
    for sec in made:
        sec.kill()


@pytest.fixture
def primary_factory(tmp_path: Path) -> Iterator[Callable[..., PrimaryReplica]]:
    made: list[PrimaryReplica] = []
    serial = iter(range(1000))

    def make(size: int, uri: str | None, **kwargs: Any) -> PrimaryReplica:
        """A PrimaryReplica with a node's defaults (the key table's), but for the settings
        given (``timeout=2.0``); other keyword arguments go to PrimaryReplica itself."""
        n = next(serial)
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in SETTINGS}
        settings = replace(primary_settings(), **given)
        disk = RawImage.create(tmp_path / f"primary{n}.img", size)
        try:
            rep = PrimaryReplica(f"disk{n}", disk, uri, settings, **kwargs)
        except BaseException:
            disk.close()
            raise
        made.append(rep)
        return rep

    yield make
    for rep in made:
        rep.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed cluster scenario (tests/test_pacemaker.py) shows its timeline and folder."""
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "repdisk_cluster", None)
    if report.failed and cluster is not None:
        report.sections.append(("cluster timeline", f"evidence: {cluster.folder}\n"
                                                    f"{cluster.timeline_text()}"))
