"""The Xen lab's image build: only a missing prerequisite is a skip, any other failure fails.

``build_outcome`` judges what build-image.sh did; the network probe is passed
in, so nothing here builds, boots or reaches a mirror.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.xenlab import lab
from tests.xenlab.lab import LabBuildFailed, LabUnavailable, build_outcome


def sources_answer() -> None:
    return None


def mirror_down() -> str:
    return "Debian mirror unreachable: http://deb.debian.org/debian/dists/bookworm/Release: timed out"


def never_asked() -> str:
    raise AssertionError("the sources are probed only once a build has failed")


def test_a_built_image_is_the_last_line_of_the_output() -> None:
    out = "building...\n/var/cache/relocd-xenlab/image-0123456789ab\n"
    assert build_outcome(0, out, "", never_asked) == Path("/var/cache/relocd-xenlab/image-0123456789ab")


def test_a_missing_tool_or_root_is_a_skip_that_says_which() -> None:
    with pytest.raises(LabUnavailable, match="^build-image: needs root$"):
        build_outcome(3, "", "build-image: needs root\n", never_asked)


def test_a_failure_with_a_source_down_is_a_skip_that_names_it() -> None:
    with pytest.raises(LabUnavailable, match="^Debian mirror unreachable: "):
        build_outcome(1, "", "E: Failed getting release file\n", mirror_down)


def test_a_failure_with_everything_there_fails_with_the_last_lines() -> None:
    stderr = "".join(f"debootstrap line {i}\n" for i in range(100)) + "E: Couldn't find these debs: xen-utils-4.17\n"
    with pytest.raises(LabBuildFailed) as failed:
        build_outcome(1, "", stderr, sources_answer)
    message = str(failed.value)
    assert message.startswith("build-image.sh exited 1; its last output:\n")
    assert message.endswith("E: Couldn't find these debs: xen-utils-4.17")
    assert "debootstrap line 71\n" in message and "debootstrap line 70\n" not in message  # the last 30 lines


@pytest.mark.parametrize(
    ("returncode", "stdout", "words"),
    [(None, "", "timed out"), (0, "", "exited 0 without naming the image directory"), (2, "", "exited 2")],
)
def test_timeouts_and_odd_exits_are_failures_too(returncode: int | None, stdout: str, words: str) -> None:
    with pytest.raises(LabBuildFailed, match=words):
        build_outcome(returncode, stdout, "", sources_answer)


def test_image_or_skip_fails_a_broken_build_and_skips_a_missing_prerequisite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELOCD_XENLAB", raising=False)

    def broken() -> Path:
        raise LabBuildFailed("build-image.sh exited 1; its last output:\nE: boom")

    def no_qemu() -> Path:
        raise LabUnavailable("missing on this host: qemu-system-x86_64")

    monkeypatch.setattr(lab, "build_image", broken)
    with pytest.raises(pytest.fail.Exception, match="E: boom"):
        lab.image_or_skip()
    monkeypatch.setattr(lab, "build_image", no_qemu)
    with pytest.raises(pytest.skip.Exception, match="qemu-system-x86_64"):
        lab.image_or_skip()
