import sys
from pathlib import Path

# crafted.py and worker.py are imported by name, as tests/conftest.py does for tests/.
sys.path.insert(0, str(Path(__file__).parent))
