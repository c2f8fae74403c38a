"""Make the projects' packages importable the way their train_net.py scripts do."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for project in ("projects/DPT", "projects/Mask2Former"):
    path = str(ROOT / project)
    if path not in sys.path:
        sys.path.insert(0, path)
