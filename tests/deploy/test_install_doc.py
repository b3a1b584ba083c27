"""docs/install.md against what ships: every option install.sh takes is documented, every shipped deploy file
it names exists, and its links lead somewhere."""

from __future__ import annotations

import re
import subprocess

from tests.deploy.units import DEPLOY, JETSON

DOC = DEPLOY.parent / "docs" / "install.md"


def test_every_install_sh_option_is_in_the_doc() -> None:
    usage = subprocess.run([str(JETSON / "install.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0
    # The option list: lines that start with an option.
    options = set(re.findall(r"^  (--[a-z][a-z-]+)", usage.stdout, flags=re.MULTILINE))
    assert {"--root", "--venv", "--package", "--pip-args", "--upgrade", "--uninstall", "--purge"} <= options
    text = DOC.read_text()
    assert [option for option in sorted(options) if f"`{option}" not in text] == []


def test_the_deploy_files_and_links_it_names_exist() -> None:
    text = DOC.read_text()
    named = set(re.findall(r"`(deploy/[\w./-]+)`", text))
    assert named, "the doc names no deploy files"
    assert [path for path in sorted(named) if not (DEPLOY.parent / path).exists()] == []
    links = set(re.findall(r"\]\(([\w.-]+\.md)\)", text))
    assert [link for link in sorted(links) if not (DOC.parent / link).exists()] == []
