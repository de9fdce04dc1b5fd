import sys
from pathlib import Path

# The helpers beside the tests (chartkit, rbac) import by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
