"""``python -m mesh.launch``: the same program as ``meshrun``."""
from .cli import main

main()
