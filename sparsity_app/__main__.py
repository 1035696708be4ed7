import sys

from sparsity_app.cli.main import main

sys.exit(main())
