import sys

from fewbit_fx.cli import main

sys.exit(main())
