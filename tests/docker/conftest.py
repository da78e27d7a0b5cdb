"""Tests that need a Docker engine carry the `docker` marker: without an engine they are
skipped with the reason in one line (so `make test` passes on a machine without Docker);
`make docker-test` runs them. The image is built once per session under a tag of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.docker.engine import Containers, build, engine_missing, remove_image, unique


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needing = [item for item in items if item.get_closest_marker("docker")]
    if not needing:
        return
    reason = engine_missing()
    if reason:
        for item in needing:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def built_image() -> Iterator[tuple[str, float, str]]:
    """(tag, seconds, build output) of docker/Dockerfile built from this checkout."""
    tag = "datasync-ingest:" + unique("test")
    seconds, output = build(tag)
    try:
        yield tag, seconds, output
    finally:
        remove_image(tag)


@pytest.fixture(scope="session")
def image(built_image: tuple[str, float, str]) -> str:
    return built_image[0]


@pytest.fixture
def containers(image: str) -> Iterator[Containers]:
    made = Containers(image)
    try:
        yield made
    finally:
        made.close()
