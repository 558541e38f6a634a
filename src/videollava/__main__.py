import sys

from videollava.cli import main

sys.exit(main())
