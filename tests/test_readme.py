import re
import subprocess
import sys

import pytest

from loramix.config import keys_markdown

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.unit
def test_config_reference_is_current():
    block = re.search(r"<!-- config-keys:[^\n]*-->\n(.*?)<!-- /config-keys -->", README, re.S).group(1)
    assert block.strip() == keys_markdown().strip(), "regenerate with `loramix config --keys`"


@pytest.mark.unit
def test_setup_block_has_the_demo_and_the_tests():
    block = re.search(r"## Set up\n\n```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].endswith("loramix train -c configs/demo.yaml")
    assert block[1].endswith("python -m pytest")


@pytest.mark.unit
def test_config_keys_command_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "loramix", "config", "--keys"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == keys_markdown().strip()
