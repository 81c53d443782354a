import subprocess
import sys

import difflora


def test_version_and_python_m():
    out = subprocess.run([sys.executable, "-m", "difflora", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"difflora {difflora.__version__}"
    out = subprocess.run([sys.executable, "-m", "difflora", "no-such-job"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'no-such-job'" in out.stderr


def test_installed_metadata_matches_the_package_version():
    from importlib.metadata import version

    assert version("difflora") == difflora.__version__
