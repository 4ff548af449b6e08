import sys

from cff_inspect.cli import main

sys.exit(main())
