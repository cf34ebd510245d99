"""Run `dagster definitions validate -w workspace.yaml` with the settings' TP_* variables set."""

import os
import subprocess
import sys
from pathlib import Path

from tenant_pipelines.settings import Settings

settings = Settings.from_env()
env = {**os.environ, **settings.env()}
bin_dir = Path(sys.executable).parent
sys.exit(
    subprocess.call(
        [str(bin_dir / "dagster"), "definitions", "validate", "-w", "workspace.yaml"], env=env
    )
)
