"""python -m llava_core.cli ... (the same as the `llava-core` command)"""

import sys

from .main import main

sys.exit(main())
