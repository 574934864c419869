"""python -m llava_core.train --out DIR [--recipe default] [--budget-minutes N] [--stage 0|1|2|all] [--resume]
(the same as `llava-core train`; kept for torchrun, which runs a module)"""

from ..cli.train import main

raise SystemExit(main())
