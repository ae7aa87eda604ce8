import sys

from seqtrain.run import main

sys.exit(main())
