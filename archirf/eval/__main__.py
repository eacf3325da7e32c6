from .cli import main

from .. import exit_now

exit_now(main())
