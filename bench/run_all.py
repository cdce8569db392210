"""`make bench`: run every benchmark script in bench/ one after another and print their tables.

Each script prints the machine it ran on and a markdown table; run them alone on a quiet machine
(these 2-core machines are noisy: the scripts report medians and ratios within one run).
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

for script in sorted(HERE.glob("*.py")):
    if script.name == Path(__file__).name or script.name.startswith("_"):
        continue
    print(f"\n## {script.stem}\n", flush=True)
    result = subprocess.run([sys.executable, str(script)], cwd=HERE.parent)
    if result.returncode:
        sys.exit(f"{script.name} failed with exit code {result.returncode}")
