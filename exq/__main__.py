import sys

from exq.cli import main

sys.exit(main())
