import sys
from pathlib import Path

# tests/reference_signs.py (the numpy twin of the sign generator) is imported by name.
sys.path.insert(0, str(Path(__file__).parent))
