"""python -m llava_core.train --out DIR [--recipe default] [--budget-minutes N] [--stage 0|1|2|all] [--resume]"""

from .recipe import main

raise SystemExit(main())
